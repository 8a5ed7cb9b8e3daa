//! GEGLU for training graphs: ggml's GELU (and GEGLU) has no backward, so a graph that is
//! differentiated builds `gelu(gate) ⊙ up` from ops that have one ([`gelu_tanh`]), lets
//! ggml's autodiff differentiate that, and then turns the product node back into ggml's own
//! GEGLU ([`restore_geglu`]).
//!
//! After the rewrite the forward value is exactly the one llama.cpp computes (on the CPU
//! backend ggml's GELU reads an F16 lookup table; the GPU backends evaluate the formula), and
//! the backward nodes keep reading the composite's intermediates, so the gradient is that of
//! the exact tanh-approximated GELU. The composite's nodes stay in the graph for them.

use crate::ggml::context::{Context, Graph, Tensor};

/// √(2/π), as ggml's `SQRT_2_OVER_PI`.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation (ggml's `GELU_COEF_A`).
const GELU_COEF_A: f32 = 0.044_715;

/// gelu(x) = ½x(1 + tanh(z)), z = √(2/π)(x + 0.044715x³), built as x·σ(2z) with
/// σ(w) = exp(−softplus(−w)): every op has a backward in ggml (there is none for tanh,
/// sigmoid or GELU), nothing divides, and it stays finite for any x (softplus returns its
/// argument above 20, so large negative x gives exp(−large) = 0, large positive x gives x).
pub fn gelu_tanh<'a>(ctx: &'a Context, x: Tensor<'a>) -> Tensor<'a> {
    let x3 = ctx.mul(ctx.sqr(x), x); // x³
    let inner = ctx.add(x, ctx.scale(x3, GELU_COEF_A)); // x + 0.044715x³
    let minus_2z = ctx.scale(inner, -2.0 * SQRT_2_OVER_PI); // −2z
    let sigma = ctx.exp(ctx.scale(ctx.softplus(minus_2z), -1.0)); // σ(2z)
    ctx.mul(x, sigma)
}

/// A GEGLU built from [`gelu_tanh`] for the backward: `node` = `gelu_tanh(gate) ⊙ up`.
#[derive(Debug, Clone, Copy)]
pub struct Geglu<'a> {
    pub node: Tensor<'a>,
    pub gate: Tensor<'a>,
    pub up: Tensor<'a>,
}

/// `gelu_tanh(gate) ⊙ up`, remembered for [`restore_geglu`].
pub fn geglu_differentiable<'a>(ctx: &'a Context, gate: Tensor<'a>, up: Tensor<'a>) -> Geglu<'a> {
    assert!(gate.ne() == up.ne(), "geglu: gate {gate:?} and up {up:?} differ in shape");
    Geglu { node: ctx.mul(gelu_tanh(ctx, gate), up), gate, up }
}

/// Turns each product node back into ggml's GEGLU of the same inputs (call after the
/// backward is built: the backward then reads the composite, the forward is ggml's op).
/// Holding the graph mutably means no computation holds it.
pub fn restore_geglu<'a>(_graph: &mut Graph<'a>, nodes: &[Geglu<'a>]) {
    for g in nodes {
        // SAFETY: `geglu_split(gate, up)` has the node's F32 type and shape (checked inside),
        // gate and up come from the same context as the node (they are its composite's
        // inputs), and the graph is borrowed mutably, so no allocated computation holds it.
        unsafe { g.node.rewrite_as_geglu(g.gate, g.up) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{Backend, Capacity};

    fn gelu(x: f64) -> f64 {
        let z = SQRT_2_OVER_PI as f64 * (x + GELU_COEF_A as f64 * x * x * x);
        0.5 * x * (1.0 + z.tanh())
    }
    fn gelu_grad(x: f64) -> f64 {
        let k = SQRT_2_OVER_PI as f64;
        let z = k * (x + GELU_COEF_A as f64 * x * x * x);
        let t = z.tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * GELU_COEF_A as f64 * x * x)
    }

    /// The differentiable GEGLU against the formula computed on the host in f64 (values and
    /// both gradients, over ±30 so that both saturated ends are covered), and after
    /// [`restore_geglu`] the forward equals ggml's own GEGLU bit for bit while the gradients
    /// stay the formula's.
    #[test]
    fn geglu_gradients_are_the_formulas_and_the_forward_is_ggmls() {
        let mut backend = Backend::cpu(2).unwrap();
        let n = 601usize;
        let xs: Vec<f32> = (0..n).map(|i| -30.0 + 0.1 * i as f32).collect();
        let ups: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        // ggml's own GEGLU, in a forward-only graph (ggml has no backward for it).
        let r = {
            let ctx = Context::new(Capacity::graph(16, 16, false)).unwrap();
            let x = ctx.new_f32("x", &[n as i64]).set_input();
            let up = ctx.new_f32("up", &[n as i64]).set_input();
            let y = ctx.geglu_split(x, up).set_output();
            let mut graph = ctx.new_graph(16, false);
            graph.build_forward_expand(y);
            let mut run = backend.compute(&graph).unwrap();
            run.write_f32(x, &xs).unwrap();
            run.write_f32(up, &ups).unwrap();
            run.run().unwrap();
            run.read_f32(y).unwrap()
        };
        for restore in [false, true] {
            let ctx = Context::new(Capacity::graph(256, 256, true)).unwrap();
            let x = ctx.new_f32("x", &[n as i64]).set_input().set_param();
            let up = ctx.new_f32("up", &[n as i64]).set_input().set_param();
            let g = geglu_differentiable(&ctx, x, up);
            let out = g.node.set_output();
            let loss = ctx.sum(out).set_loss();
            let mut graph = ctx.new_graph(256, true);
            graph.build_forward_expand(loss);
            graph.build_backward_expand(&ctx);
            if restore {
                restore_geglu(&mut graph, &[g]);
            }
            let (gx, gup) = (graph.grad(x).unwrap(), graph.grad(up).unwrap());
            let mut run = backend.compute(&graph).unwrap();
            run.write_f32(x, &xs).unwrap();
            run.write_f32(up, &ups).unwrap();
            run.reset_grads();
            run.run().unwrap();
            let y = run.read_f32(out).unwrap();
            let (dx, dup) = (run.read_f32(gx).unwrap(), run.read_f32(gup).unwrap());
            for i in 0..n {
                let (xi, ui) = (xs[i] as f64, ups[i] as f64);
                let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * b.abs().max(1.0);
                assert!(
                    close(dx[i], gelu_grad(xi) * ui),
                    "d/dx at {xi}: {} vs {}",
                    dx[i],
                    gelu_grad(xi) * ui
                );
                assert!(close(dup[i], gelu(xi)), "d/dup at {xi}: {} vs {}", dup[i], gelu(xi));
                if restore {
                    assert_eq!(
                        y[i].to_bits(),
                        r[i].to_bits(),
                        "forward at {xi}: {} vs ggml {}",
                        y[i],
                        r[i]
                    );
                } else {
                    assert!(
                        close(y[i], gelu(xi) * ui),
                        "value at {xi}: {} vs {}",
                        y[i],
                        gelu(xi) * ui
                    );
                }
            }
            if !restore {
                // ggml's CPU GELU reads an F16 table: the exact composite is not bit-identical.
                assert!(y.iter().zip(&r).any(|(a, b)| a != b));
            }
        }
    }
}
