//! Prometheus counters for `GET /metrics` (text exposition format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the request latency histogram.
const BUCKETS: [f64; 12] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Default)]
struct PerModel {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    latency: Histogram,
}

#[derive(Default)]
struct Inner {
    /// (endpoint, status) → count.
    requests: BTreeMap<(String, u16), u64>,
    /// model (base, adapter name, or "a+b" for a stack) → counters.
    models: BTreeMap<String, PerModel>,
    decode_steps: u64,
    decode_tokens: u64,
    decode_seconds: f64,
    queue_depth: usize,
    active: usize,
    lanes: usize,
    adapters: usize,
    rejected_queue_full: u64,
}

/// All server metrics, behind one lock (updates are a few per request or step).
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint.to_string(), status)).or_default() += 1);
    }

    /// A finished generation for `model`.
    pub fn generation(
        &self,
        model: &str,
        prompt_tokens: usize,
        completion_tokens: usize,
        seconds: f64,
    ) {
        self.with(|m| {
            let e = m.models.entry(model.to_string()).or_default();
            e.requests += 1;
            e.prompt_tokens += prompt_tokens as u64;
            e.completion_tokens += completion_tokens as u64;
            e.latency.observe(seconds);
        });
    }

    pub fn queue_full(&self) {
        self.with(|m| m.rejected_queue_full += 1);
    }

    pub fn observe_decode(&self, tokens: usize, seconds: f64) {
        self.with(|m| {
            m.decode_steps += 1;
            m.decode_tokens += tokens as u64;
            m.decode_seconds += seconds;
        });
    }

    pub fn set_engine_state(&self, queue: usize, active: usize, lanes: usize, adapters: usize) {
        self.with(|m| {
            m.queue_depth = queue;
            m.active = active;
            m.lanes = lanes;
            m.adapters = adapters;
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut o = String::new();
            let _ = writeln!(o, "# HELP grit_http_requests_total HTTP requests by endpoint and status.");
            let _ = writeln!(o, "# TYPE grit_http_requests_total counter");
            for ((ep, st), n) in &m.requests {
                let _ = writeln!(o, "grit_http_requests_total{{endpoint=\"{}\",status=\"{st}\"}} {n}", esc(ep));
            }
            let counter = |o: &mut String, name: &str, help: &str, f: &dyn Fn(&PerModel) -> u64| {
                let _ = writeln!(o, "# HELP {name} {help}");
                let _ = writeln!(o, "# TYPE {name} counter");
                for (model, pm) in &m.models {
                    let _ = writeln!(o, "{name}{{model=\"{}\"}} {}", esc(model), f(pm));
                }
            };
            counter(&mut o, "grit_generation_requests_total", "Finished generations per model or adapter set.", &|p| p.requests);
            counter(&mut o, "grit_prompt_tokens_total", "Prompt tokens per model or adapter set.", &|p| p.prompt_tokens);
            counter(&mut o, "grit_completion_tokens_total", "Generated tokens per model or adapter set.", &|p| p.completion_tokens);
            let _ = writeln!(o, "# HELP grit_request_duration_seconds Generation latency (request received to last token) per model or adapter set.");
            let _ = writeln!(o, "# TYPE grit_request_duration_seconds histogram");
            for (model, pm) in &m.models {
                let l = esc(model);
                for (i, b) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(o, "grit_request_duration_seconds_bucket{{model=\"{l}\",le=\"{b}\"}} {}", pm.latency.counts[i]);
                }
                let _ = writeln!(o, "grit_request_duration_seconds_bucket{{model=\"{l}\",le=\"+Inf\"}} {}", pm.latency.count);
                let _ = writeln!(o, "grit_request_duration_seconds_sum{{model=\"{l}\"}} {}", pm.latency.sum);
                let _ = writeln!(o, "grit_request_duration_seconds_count{{model=\"{l}\"}} {}", pm.latency.count);
            }
            let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
                let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            };
            gauge(&mut o, "grit_queue_depth", "Requests waiting for a decoding slot.", m.queue_depth as f64);
            gauge(&mut o, "grit_active_sequences", "Requests decoding now.", m.active as f64);
            gauge(&mut o, "grit_contexts", "llama.cpp contexts (one per adapter set in use).", m.lanes as f64);
            gauge(&mut o, "grit_adapters_loaded", "LoRA adapters loaded.", m.adapters as f64);
            let _ = writeln!(
                o,
                "# HELP grit_rejected_queue_full_total Requests answered 429 because the queue was full.\n# TYPE grit_rejected_queue_full_total counter\ngrit_rejected_queue_full_total {}",
                m.rejected_queue_full
            );
            let _ = writeln!(o, "# HELP grit_decode_steps_total llama_decode calls.\n# TYPE grit_decode_steps_total counter\ngrit_decode_steps_total {}", m.decode_steps);
            let _ = writeln!(
                o,
                "# HELP grit_decode_tokens_total Tokens through llama_decode (prompt and generated).\n# TYPE grit_decode_tokens_total counter\ngrit_decode_tokens_total {}",
                m.decode_tokens
            );
            let _ = writeln!(o, "# HELP grit_decode_seconds_total Time spent in llama_decode.\n# TYPE grit_decode_seconds_total counter\ngrit_decode_seconds_total {}", m.decode_seconds);
            o
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.generation("base", 5, 7, 0.3);
        let t = m.render();
        assert!(
            t.contains("grit_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1")
        );
        assert!(t.contains("grit_completion_tokens_total{model=\"base\"} 7"));
        assert!(t.contains("grit_request_duration_seconds_bucket{model=\"base\",le=\"0.25\"} 0"));
        assert!(t.contains("grit_request_duration_seconds_bucket{model=\"base\",le=\"0.5\"} 1"));
    }
}
