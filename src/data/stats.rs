//! Dataset statistics (`grit train --dry-run`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::Format;

/// How many examples and tokens a dataset holds, what is trained, what was cut or skipped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// The files the examples came from, as given.
    pub files: Vec<String>,
    /// Examples kept (plain-text windows count one each).
    pub examples: usize,
    /// Examples per format.
    pub formats: BTreeMap<Format, usize>,
    /// Tokens of the kept examples (after truncation).
    pub tokens: usize,
    /// Trained predictions: tokens with loss (every token but the first of an example can be).
    pub trained_tokens: usize,
    /// Examples longer than `max_seq_len`, cut to it.
    pub truncated_examples: usize,
    /// Tokens cut from those.
    pub truncated_tokens: usize,
    /// Examples dropped because nothing in them is trained (e.g. truncation cut every
    /// assistant token).
    pub dropped_examples: usize,
    /// Of those, how many had their trained part cut by truncation.
    pub dropped_by_truncation: usize,
    /// Malformed rows skipped with `skip_bad_rows`.
    pub skipped_rows: usize,
    /// The first few skipped rows' errors.
    pub skipped_reasons: Vec<String>,
    /// Sequences after packing.
    pub packed_sequences: usize,
    pub max_seq_len: usize,
    /// The longest example before truncation, in tokens.
    pub longest_example: usize,
}

/// How many skipped rows' errors are kept for the report.
pub const MAX_SKIPPED_REASONS: usize = 5;

impl DataStats {
    /// Fraction of tokens that carry no loss (0 when there are no tokens).
    pub fn masked_fraction(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            1.0 - self.trained_tokens as f64 / self.tokens as f64
        }
    }

    /// Fraction of the packed sequences' capacity (`packed_sequences × max_seq_len`) used.
    pub fn fill(&self) -> f64 {
        let cap = self.packed_sequences * self.max_seq_len;
        if cap == 0 {
            0.0
        } else {
            self.tokens as f64 / cap as f64
        }
    }
}

/// 1234567 → "1,234,567".
pub(crate) fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for DataStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, k: &str, v: String| writeln!(f, "  {k:<18} {v}");
        if !self.files.is_empty() {
            row(f, "files", self.files.join(", "))?;
        }
        let formats: Vec<String> =
            self.formats.iter().map(|(k, v)| format!("{} {}", k.name(), thousands(*v))).collect();
        let ex = if formats.is_empty() {
            thousands(self.examples)
        } else {
            format!("{} ({})", thousands(self.examples), formats.join(", "))
        };
        row(f, "examples", ex)?;
        row(
            f,
            "tokens",
            format!(
                "{} (longest example {})",
                thousands(self.tokens),
                thousands(self.longest_example)
            ),
        )?;
        row(
            f,
            "trained tokens",
            format!(
                "{} ({:.1}% masked)",
                thousands(self.trained_tokens),
                100.0 * self.masked_fraction()
            ),
        )?;
        row(
            f,
            "truncated",
            format!(
                "{} examples, {} tokens lost (max_seq_len {})",
                thousands(self.truncated_examples),
                thousands(self.truncated_tokens),
                self.max_seq_len
            ),
        )?;
        if self.dropped_examples > 0 {
            let why = if self.dropped_by_truncation > 0 {
                format!(" ({} of them cut by truncation)", thousands(self.dropped_by_truncation))
            } else {
                String::new()
            };
            row(
                f,
                "dropped",
                format!("{} examples with nothing to train{why}", thousands(self.dropped_examples)),
            )?;
        }
        row(f, "skipped bad rows", thousands(self.skipped_rows))?;
        for r in &self.skipped_reasons {
            writeln!(f, "    {r}")?;
        }
        if self.skipped_rows > self.skipped_reasons.len() {
            writeln!(f, "    … and {} more", self.skipped_rows - self.skipped_reasons.len())?;
        }
        row(
            f,
            "packed sequences",
            format!("{} ({:.1}% full)", thousands(self.packed_sequences), 100.0 * self.fill()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn table_shows_every_number() {
        let mut s = DataStats {
            files: vec!["d.jsonl".into()],
            examples: 3,
            tokens: 1000,
            trained_tokens: 250,
            truncated_examples: 1,
            truncated_tokens: 44,
            skipped_rows: 7,
            skipped_reasons: vec!["d.jsonl:2: field 'text' is missing".into()],
            packed_sequences: 4,
            max_seq_len: 256,
            longest_example: 300,
            ..Default::default()
        };
        s.formats.insert(Format::Chat, 2);
        s.formats.insert(Format::Text, 1);
        let t = s.to_string();
        for want in [
            "d.jsonl",
            "3 (chat 2, text 1)",
            "1,000",
            "250 (75.0% masked)",
            "1 examples, 44 tokens lost (max_seq_len 256)",
            "skipped bad rows   7",
            "field 'text' is missing",
            "and 6 more",
            "4 (97.7% full)",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert!((s.masked_fraction() - 0.75).abs() < 1e-12);
    }
}
