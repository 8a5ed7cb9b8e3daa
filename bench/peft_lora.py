#!/usr/bin/env python3
"""Hugging Face PEFT LoRA side of grit's training benchmark.

Fine-tunes LoRA adapters with PyTorch + PEFT on the same GGUF base that grit trains on
(transformers dequantizes it to float32 with `gguf_file=`), with the configuration a careful
user would pick for a fair comparison with `grit train --method lora`:

  float32, torch.set_num_threads(--threads), LoRA r=16 alpha=32 (scale alpha/r), dropout 0,
  targets q/k/v/o/gate/up/down_proj, batch 1, sequence 256, AdamW (lr 2e-4, betas (0.9, 0.999),
  eps 1e-8, weight decay 0) at a CONSTANT learning rate (no warm-up/decay schedule: it changes
  nothing in the step time), global gradient-norm clipping at 1.0, model.train() with every
  dropout at 0.

The loss is computed here from the logits, not by transformers (which would shift the labels):
the mean cross-entropy of `logits[i]` against `labels[i]` over the positions with
`loss_mask[i] = 1`, the same definition grit uses, so the step-1 losses of the two sides are
comparable on the same token ids.

Data, one sequence per optimizer step, in order:
  --tokens FILE.json  {"sequences": [{"tokens": [...], "labels": [...], "loss_mask": [...]}, ...]}
                      as dumped by `grit train --dump-tokens FILE` (optional "segment"/"pos"
                      arrays of packed sequences are honoured: block-diagonal causal mask and
                      per-segment positions).
  --text FILE         otherwise: the text is tokenized with the model's HF tokenizer (no BOS,
                      like llama.cpp for this model; EOS appended like grit does for plain text)
                      and cut into windows of --seq-len tokens overlapping by one token, as grit
                      cuts plain text: position i predicts token i+1 of the window, every such
                      prediction trained (seq_len - 1 per window; the last position has no next
                      token in its window and is not trained).

Timing: one step = forward + backward + clip + optimizer step + zero_grad, wall clock;
--warmup-steps steps are discarded, then --measure-steps steps are timed and their median is
reported. tokens/s = tokens per step (the sequence length, --seq-len in the benchmark) / median.
Peak RSS is the whole process's VmHWM from /proc/self/status (it includes loading the model).

Human-readable progress goes to stderr; --json prints one JSON object on stdout at the end.
"""

import argparse
import json
import os
import sys
import time
import warnings


def die(msg, code=2):
    print(f"peft_lora.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def proc_status_bytes(key):
    """A `kB` field of /proc/self/status (VmHWM, VmRSS) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process) from /proc, or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = sum(v[:8]) - v[3] - v[4]  # everything but idle and iowait (guest is in user)
        with open("/proc/self/stat") as f:
            w = f.read().rsplit(")", 1)[1].split()
        return busy, int(w[11]) + int(w[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def background_load(t0, t1, wall_s):
    """CPU used by other processes during the timed steps, in cores (None when unknown)."""
    if t0 is None or t1 is None or wall_s <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((t1[0] - t0[0]) - (t1[1] - t0[1])) / hz / wall_s)


GRIT_TO_HF = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
              "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}


def parse_args(argv):
    default_model = os.path.join(
        os.environ.get("GRIT_HOME", os.path.expanduser("~/.cache/grit")),
        "models",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    p = argparse.ArgumentParser(
        description="PEFT LoRA training-step benchmark (the Hugging Face side of grit's "
        "grit-vs-PEFT comparison).",
    )
    p.add_argument("--model", default=default_model, metavar="PATH.gguf",
                   help="GGUF base model (default: %(default)s)")
    p.add_argument("--tokens", metavar="FILE.json",
                   help="token ids to train on, as dumped by `grit train --dump-tokens`")
    p.add_argument("--text", metavar="FILE",
                   help="plain text to tokenize with the HF tokenizer when --tokens is not given")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length (default: 256)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; scale alpha/rank (default: 32)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated modules to adapt, HF names or grit's (attn_q, ..., ffn_down); "
                   "default: all 7")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate, constant (default: 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed warm-up steps (default: 2)")
    p.add_argument("--measure-steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--batch", type=int, default=1,
                   help="sequences per step, taken in order from the token file (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the LoRA A init (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout at the end")
    a = p.parse_args(argv)

    if a.seq_len < 2:
        p.error("--seq-len must be at least 2")
    if a.rank < 1:
        p.error("--rank must be at least 1")
    if a.threads < 1:
        p.error("--threads must be at least 1")
    if a.warmup_steps < 0 or a.measure_steps < 1:
        p.error("--warmup-steps must be >= 0 and --measure-steps >= 1")
    # grit's (llama.cpp's) module names are accepted too: attn_q -> q_proj, ...
    a.targets = [GRIT_TO_HF.get(t.strip(), t.strip()) for t in a.targets.split(",") if t.strip()]
    if not a.targets:
        p.error("--targets is empty")
    if not os.path.isfile(a.model):
        die(f"model file not found: {a.model}")
    if a.tokens is None and a.text is None:
        p.error("give --tokens FILE.json (from `grit train --dump-tokens`) or --text FILE")
    if a.tokens is not None and not os.path.isfile(a.tokens):
        die(f"token file not found: {a.tokens}")
    if a.tokens is None and not os.path.isfile(a.text):
        die(f"text file not found: {a.text}")
    return a


def load_token_file(path, seq_len):
    """Sequences of a grit token dump, validated; lists of ints/floats."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        die(f"{path}: not valid JSON: {e}")
    except (OSError, UnicodeDecodeError) as e:
        die(f"{path}: cannot read: {e}")
    seqs = doc.get("sequences") if isinstance(doc, dict) else None
    if not isinstance(seqs, list) or not seqs:
        die(f'{path}: expected a JSON object {{"sequences": [{{"tokens", "labels", "loss_mask"}}, ...]}} '
            "with at least one sequence")
    out = []
    for k, s in enumerate(seqs):
        where = f"{path}: sequences[{k}]"
        if not isinstance(s, dict):
            die(f"{where}: not an object")
        for key in ("tokens", "labels", "loss_mask"):
            if not isinstance(s.get(key), list):
                die(f"{where}: missing or non-array field '{key}'")
        n = len(s["tokens"])
        if n == 0:
            die(f"{where}: empty 'tokens'")
        for key in ("labels", "loss_mask", "segment", "pos"):
            if key in s and len(s[key]) != n:
                die(f"{where}: '{key}' has {len(s[key])} entries for {n} tokens")
        for key in ("tokens", "labels", "segment", "pos"):
            if key in s and not all(isinstance(v, int) and not isinstance(v, bool) for v in s[key]):
                die(f"{where}: '{key}' must hold integers")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s["loss_mask"]):
            die(f"{where}: 'loss_mask' must hold numbers")
        if n > seq_len:
            die(f"{where}: {n} tokens, longer than --seq-len {seq_len}")
        if not any(v > 0 for v in s["loss_mask"]):
            die(f"{where}: no position has loss_mask 1")
        out.append({key: s[key] for key in ("tokens", "labels", "loss_mask", "segment", "pos") if key in s})
    return out


def text_windows(tokenizer, path, seq_len, max_windows):
    """grit's plain-text windows: seq_len tokens, stride seq_len - 1, next-token labels."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"{path}: cannot read: {e}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if len(ids) < 2:
        die(f"{path}: fewer than 2 tokens")
    out, start, stride = [], 0, seq_len - 1
    while start + 1 < len(ids) and len(out) < max_windows:
        end = min(start + seq_len, len(ids))
        w = ids[start:end]
        labels = w[1:] + [eos if eos is not None else 0]
        mask = [1.0] * (len(w) - 1) + [0.0]
        out.append({"tokens": w, "labels": labels, "loss_mask": mask})
        if end == len(ids):
            break
        start += stride
    return out, len(ids)


def main(argv):
    a = parse_args(argv)
    # Validate a token file before spending ~20 s on loading the model.
    seqs = load_token_file(a.tokens, a.seq_len) if a.tokens is not None else None

    # One thread pool of the requested size everywhere (OpenMP/MKL read these at import).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization progress bar
    try:
        import torch
        import torch.nn.functional as F
        import transformers
        import peft
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from peft import LoraConfig, get_peft_model
        import gguf  # noqa: F401  (transformers needs it for gguf_file=)
    except ImportError as e:
        die(f"missing Python package ({e.name or e}); install the benchmark's dependencies with\n"
            "  python3 -m venv .venv-bench && .venv-bench/bin/pip install "
            "torch transformers peft gguf sentencepiece\n"
            "and run this script with .venv-bench/bin/python")
    from importlib.metadata import version as pkg_version

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    n_steps = a.warmup_steps + a.measure_steps
    model_dir, model_file = os.path.split(os.path.abspath(a.model))

    log(f"loading {a.model} with transformers (dequantized to float32) ...")
    t0 = time.perf_counter()
    try:
        tokenizer = None
        if a.tokens is None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
        model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        die(f"transformers could not load {a.model}: {e}")
    load_s = time.perf_counter() - t0
    rss_after_load = proc_status_bytes("VmHWM")

    cfg = model.config
    model.config.use_cache = False
    # No dropout anywhere (LLaMA's attention_dropout defaults to 0; make sure).
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if getattr(cfg, key, None):
            setattr(cfg, key, 0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in a.targets if t not in present]
    if missing:
        die(f"target module(s) {', '.join(missing)} not in this model (it has e.g. "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")

    lcfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    # Data.
    if a.tokens is not None:
        source = {"tokens": os.path.abspath(a.tokens)}
    else:
        seqs, n_text_tokens = text_windows(tokenizer, a.text, a.seq_len, n_steps)
        source = {"text": os.path.abspath(a.text), "text_tokens": n_text_tokens, "tokenizer": "hf-gguf"}
    vocab = model.get_input_embeddings().weight.shape[0]
    for k, s in enumerate(seqs):
        bad = [t for t in s["tokens"] + s["labels"] if t < 0 or t >= vocab]
        if bad:
            die(f"sequence {k}: token id {bad[0]} outside the model's vocabulary (0..{vocab - 1}); "
                "was the token file made with the same model?")
    if len(seqs) < n_steps:
        log(f"note: {len(seqs)} sequence(s) for {n_steps} steps; reusing them in order")
    short = [k for k, s in enumerate(seqs[:n_steps]) if len(s["tokens"]) != a.seq_len]
    if short:
        log(f"note: {len(short)} of the first {min(n_steps, len(seqs))} sequences are not "
            f"{a.seq_len} tokens long (e.g. sequence {short[0]}: {len(seqs[short[0]]['tokens'])})")

    def batch(s):
        n = len(s["tokens"])
        ids = torch.tensor([s["tokens"]], dtype=torch.long)
        labels = torch.tensor(s["labels"], dtype=torch.long)
        mask = torch.tensor(s["loss_mask"], dtype=torch.float32) > 0
        kw = {}
        seg, pos = s.get("segment"), s.get("pos")
        packed = seg is not None and len(set(seg)) > 1
        if packed or (pos is not None and pos != list(range(n))):
            # Several examples in one sequence: each attends only to itself, positions restart.
            pos_t = torch.tensor([pos if pos is not None else list(range(n))], dtype=torch.long)
            kw["position_ids"] = pos_t
            if packed:
                seg_t = torch.tensor(seg)
                allowed = (seg_t[:, None] == seg_t[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
                m4 = torch.zeros(1, 1, n, n, dtype=torch.float32)
                m4.masked_fill_(~allowed, torch.finfo(torch.float32).min)
                kw["attention_mask"] = m4
        return ids, labels, mask, kw

    def batch_of(group):
        """Several sequences as one batch: padded at the end to the longest (padding neither
        trained nor attended to by real tokens, the attention being causal)."""
        if len(group) == 1:
            return batch(group[0])
        n = max(len(s["tokens"]) for s in group)
        ids = torch.zeros(len(group), n, dtype=torch.long)
        labels = torch.zeros(len(group), n, dtype=torch.long)
        mask = torch.zeros(len(group), n, dtype=torch.bool)
        pos_t = torch.arange(n).repeat(len(group), 1)
        m4 = torch.zeros(len(group), 1, n, n, dtype=torch.float32)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for b, s in enumerate(group):
            k = len(s["tokens"])
            ids[b, :k] = torch.tensor(s["tokens"])
            labels[b, :k] = torch.tensor(s["labels"])
            mask[b, :k] = torch.tensor(s["loss_mask"], dtype=torch.float32) > 0
            seg = torch.tensor(list(s.get("segment") or [0] * k) + [-1] * (n - k))
            if s.get("pos") is not None:
                pos_t[b, :k] = torch.tensor(s["pos"])
            allowed = (seg[:, None] == seg[None, :]) & causal
            allowed[k:, :] = causal[k:, :]  # padding rows attend causally (never read)
            m4[b, 0].masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return ids, labels, mask, {"position_ids": pos_t, "attention_mask": m4}

    log(f"model: {cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}, vocab {vocab}, "
        f"loaded in {load_s:.1f} s")
    log(f"LoRA r={a.rank} alpha={a.alpha:g} (scale {a.alpha / a.rank:g}) on {','.join(a.targets)}: "
        f"{trainable:,} trainable of {total:,} parameters")
    log(f"torch {torch.__version__}, {a.threads} thread(s), attention {getattr(cfg, '_attn_implementation', '?')}; "
        f"{a.warmup_steps} warm-up + {a.measure_steps} timed steps, seq {a.seq_len}, batch {a.batch}")

    losses, times, ntoks, ntrained = [], [], [], []
    ticks0 = cpu_ticks() if a.warmup_steps == 0 else None
    for step in range(n_steps):
        if step == a.warmup_steps and step > 0:
            ticks0 = cpu_ticks()
        group = [seqs[(step * a.batch + j) % len(seqs)] for j in range(a.batch)]
        ids, labels, mask, kw = batch_of(group)
        t = time.perf_counter()
        logits = model(input_ids=ids, **kw).logits
        logits = logits[0] if a.batch == 1 else logits
        loss = F.cross_entropy(logits[mask].float(), labels[mask])
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(loss.item())
        times.append(dt)
        ntoks.append(ids.numel())
        ntrained.append(int(mask.sum()))
        tag = "warm-up" if step < a.warmup_steps else "timed"
        log(f"step {step + 1:3d}/{n_steps} ({tag:7}) loss {losses[-1]:.4f}  grad_norm {float(gnorm):.4f}  "
            f"{dt:.3f} s  {ids.numel() / dt:.1f} tokens/s")

    bg = background_load(ticks0, cpu_ticks(), sum(times[a.warmup_steps:]))
    timed = sorted(times[a.warmup_steps:])
    m = len(timed)
    median = timed[m // 2] if m % 2 else 0.5 * (timed[m // 2 - 1] + timed[m // 2])
    tokens_per_step = sorted(ntoks[a.warmup_steps:])[m // 2]
    peak = proc_status_bytes("VmHWM")

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "python": sys.version.split()[0]}
    try:
        versions["gguf"] = pkg_version("gguf")
    except Exception:
        pass
    result = {
        "impl": "peft",
        "tokens_per_s": tokens_per_step / median,
        "median_step_s": median,
        "step_times_s": times[a.warmup_steps:],
        "warmup_step_times_s": times[:a.warmup_steps],
        "step1_loss": losses[0],
        "losses": losses,
        "peak_rss_bytes": peak,
        "peak_rss_after_load_bytes": rss_after_load,
        "trainable_params": trainable,
        "seq_len": a.seq_len,
        "tokens_per_step": tokens_per_step,
        "trained_tokens_per_step": ntrained,
        "threads": a.threads,
        "rank": a.rank,
        "alpha": a.alpha,
        "targets": a.targets,
        "lr": a.lr,
        "lr_schedule": "constant",
        "max_grad_norm": 1.0,
        "warmup_steps": a.warmup_steps,
        "measure_steps": a.measure_steps,
        "dtype": "float32",
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "load_s": load_s,
        "background_cpu_cores": bg,
        "model": os.path.abspath(a.model),
        "data": source,
        "versions": versions,
    }
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "n/a"  # noqa: E731
    log(f"median step {median:.3f} s over {m} timed steps -> {result['tokens_per_s']:.1f} tokens/s; "
        f"step-1 loss {losses[0]:.4f}; peak RSS (VmHWM) {gib(peak)} (after load {gib(rss_after_load)})")
    if bg is not None and bg > 0.1:
        log(f"warning: other processes used {bg:.2f} CPU cores on average during the timed steps "
            f"(of {os.cpu_count()}); the step times are not those of a quiet machine")
    if a.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        die("interrupted", 130)
