#!/usr/bin/env python3
"""Hugging Face check of `grit export --to peft` (run by bench/hf_peft_check.sh).

transformers loads a GGUF base with `gguf_file=` (dequantized to float32; it un-permutes
llama's attn_q/attn_k rows as it loads), `PeftModel.from_pretrained` loads the PEFT folder grit
exported, and the logits on grit's token ids are compared with grit's own:

  llama.f32  llama.cpp with the GGUF adapter (what `grit generate --adapter` serves)
  graph.f32  grit's training graph with the same adapter
  base.f32   llama.cpp without the adapter

hf_peft_check.sh runs both engines on the F32 expansion of the quantized base (`grit merge
--scale 0 --type f32 --convert-all`: the same weight values, dequantized), because on the Q4_1
file itself ggml rounds activations to 8 bits in its quantized matmuls and transformers does
not, which alone moves the logits by rms ~0.2 and would hide what this check is about.

  d_base    = HF base   vs grit base         (engine noise, no adapter involved)
  d_adapter = HF+PEFT   vs grit + adapter    (what a user sees)
  effect    = grit + adapter vs grit base    (how much the adapter changes the logits)
  d_effect  = (HF+PEFT − HF base) vs (grit + adapter − grit base)   (the adapter's own effect)

Bounds (pass when all hold):
  rms(d_adapter) ≤ 2·rms(d_base) + 0.01,
  rms(d_effect)  ≤ 0.02·rms(effect),
  rms(effect)    ≥ 20·rms(d_base)          (the adapter is really applied and visible).
A negative control loads the same adapter with lora_B of q/k left in GGUF row order (the
permutation forgotten) and must fail the d_effect bound (rms(control) > 0.02·rms(effect)).

Prints a report; --json prints one JSON object instead. Exit status 1 when a bound fails.
"""

import argparse
import json
import os
import sys
import warnings


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the base GGUF model")
    ap.add_argument("--peft", required=True, help="the PEFT folder grit exported")
    ap.add_argument("--grit", required=True, help="folder with tokens.json, base.f32, llama.f32, graph.f32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    os.environ.setdefault("TQDM_DISABLE", "1")
    import numpy as np
    import torch
    import transformers
    import peft
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    from safetensors.torch import load_file

    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    tokens = json.load(open(os.path.join(a.grit, "tokens.json")))
    n = len(tokens)

    def grit_logits(name):
        x = np.fromfile(os.path.join(a.grit, name), dtype="<f4")
        return x.reshape(n, -1).astype(np.float64)

    g_base, g_llama, g_graph = grit_logits("base.f32"), grit_logits("llama.f32"), grit_logits("graph.f32")

    model_dir, model_file = os.path.split(os.path.abspath(a.model))
    base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
    base.eval()
    ids = torch.tensor([tokens])

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False).logits[0].double().numpy()

    hf_base = logits(base)
    model = PeftModel.from_pretrained(base, a.peft)
    model.eval()
    cfg = model.peft_config["default"]
    n_lora = sum(1 for name, _ in model.named_modules() if name.endswith("q_proj") or name.endswith("k_proj"))
    hf_peft = logits(model)

    # Negative control: lora_B of q/k in GGUF row order (llama.cpp's permutation not undone).
    sd = load_file(os.path.join(a.peft, "adapter_model.safetensors"))
    hcfg = base.config
    wrong = {}
    for k, v in sd.items():
        if ".lora_B." in k and (".q_proj." in k or ".k_proj." in k):
            heads = hcfg.num_attention_heads if ".q_proj." in k else hcfg.num_key_value_heads
            v = v.reshape(heads, 2, v.shape[0] // heads // 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
        wrong[k] = v
    from peft import set_peft_model_state_dict
    set_peft_model_state_dict(model, wrong)
    hf_wrong = logits(model)

    def rms(x):
        return float(np.sqrt(np.mean(np.square(x))))

    def amax(x):
        return float(np.max(np.abs(x)))

    def argmax_agree(x, y):
        return float(np.mean(np.argmax(x, axis=1) == np.argmax(y, axis=1)))

    effect = g_llama - g_base
    r = {
        "tokens": n,
        "vocab": int(g_base.shape[1]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "peft_config": {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "rank_pattern": len(cfg.rank_pattern or {}),
                        "alpha_pattern": len(cfg.alpha_pattern or {}), "target_modules": len(cfg.target_modules or [])},
        "lora_modules_q_k": sum(1 for k in sd if ".lora_A." in k and (".q_proj." in k or ".k_proj." in k)),
        "logit_rms": rms(g_base),
        "d_base_rms": rms(hf_base - g_base), "d_base_max": amax(hf_base - g_base),
        "d_adapter_rms": rms(hf_peft - g_llama), "d_adapter_max": amax(hf_peft - g_llama),
        "d_adapter_graph_rms": rms(hf_peft - g_graph),
        "grit_llama_vs_graph_max": amax(g_llama - g_graph),
        "effect_rms": rms(effect),
        "d_effect_rms": rms((hf_peft - hf_base) - effect), "d_effect_max": amax((hf_peft - hf_base) - effect),
        "control_d_effect_rms": rms((hf_wrong - hf_base) - effect),
        "argmax_agreement_hf_peft_vs_grit": argmax_agree(hf_peft, g_llama),
        "argmax_agreement_base": argmax_agree(hf_base, g_base),
    }
    checks = {
        "d_adapter_rms <= 2*d_base_rms + 0.01": r["d_adapter_rms"] <= 2 * r["d_base_rms"] + 0.01,
        "d_effect_rms <= 0.02*effect_rms": r["d_effect_rms"] <= 0.02 * r["effect_rms"],
        "effect_rms >= 20*d_base_rms": r["effect_rms"] >= 20 * r["d_base_rms"],
        "control (no un-permutation) fails the effect bound: control_d_effect_rms > 0.02*effect_rms": r["control_d_effect_rms"] > 0.02 * r["effect_rms"],
    }
    r["checks"] = checks
    r["pass"] = all(checks.values())
    if a.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"Hugging Face PEFT check: {n} tokens, vocab {r['vocab']}; torch {torch.__version__}, "
              f"transformers {transformers.__version__}, peft {peft.__version__}")
        print(f"  PEFT config: r {cfg.r}, lora_alpha {cfg.lora_alpha}, {r['peft_config']['rank_pattern']} rank_pattern and "
              f"{r['peft_config']['alpha_pattern']} alpha_pattern entries, {r['peft_config']['target_modules']} target modules "
              f"({r['lora_modules_q_k']} of them q_proj/k_proj)")
        print(f"  logit rms (grit base)                          {r['logit_rms']:.3e}")
        print(f"  HF base   vs grit base (engine noise)      rms {r['d_base_rms']:.3e}  max {r['d_base_max']:.3e}  argmax agree {r['argmax_agreement_base']:.3f}")
        print(f"  HF+PEFT   vs grit+adapter (llama.cpp)      rms {r['d_adapter_rms']:.3e}  max {r['d_adapter_max']:.3e}  argmax agree {r['argmax_agreement_hf_peft_vs_grit']:.3f}")
        print(f"  HF+PEFT   vs grit+adapter (training graph) rms {r['d_adapter_graph_rms']:.3e}  (llama.cpp vs graph max {r['grit_llama_vs_graph_max']:.2e})")
        print(f"  adapter effect in grit                     rms {r['effect_rms']:.3e}")
        print(f"  effect HF+PEFT vs effect grit              rms {r['d_effect_rms']:.3e}  max {r['d_effect_max']:.3e}")
        print(f"  control: q/k lora_B not un-permuted        rms {r['control_d_effect_rms']:.3e}")
        for k, ok in checks.items():
            print(f"  [{'ok' if ok else 'FAIL'}] {k}")
        print("PASS" if r["pass"] else "FAIL")
    sys.exit(0 if r["pass"] else 1)


if __name__ == "__main__":
    main()
