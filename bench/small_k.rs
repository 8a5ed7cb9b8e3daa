//! Small-K products on the training shapes (LoRA's B·u with K = rank, the Q4_1 split's C·s
//! with K = d_in/32): `small_k [THREADS] [TOKENS]` prints GFLOP/s of ggml's dot-product
//! matmul `mul_mat(a [K, M], b [K, T])` against the same product as ggml's outer-product sum
//! `out_prod(aᵀ [M, K], transpose(b) [T, K])` and as grit's small-k kernel
//! (`Context::out_prod_tiled`, same operands), which the training graph uses.

use std::time::Instant;

use grit::ggml::{Backend, Capacity, Context};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    MulMat,
    OutProd,
    SmallK,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let t: i64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let mut backend = Backend::cpu(threads)?;
    println!(
        "{:>5} {:>6} {:>5} {:>9} {:>9} {:>9} {:>13} {:>14}",
        "K", "M", "T", "mul_mat", "out_prod", "small_k", "small_k/mul", "small_k/outer"
    );
    for (k, m) in [
        (16i64, 576i64),
        (16, 1536),
        (16, 192),
        (18, 576),
        (18, 1536),
        (48, 576),
        (8, 1536),
        (32, 1536),
    ] {
        let mut rates = Vec::new();
        for form in [Form::MulMat, Form::OutProd, Form::SmallK] {
            let outer = form != Form::MulMat;
            let n = 30;
            let ctx = Context::new(Capacity::graph(8 * n, 8 * n, false))?;
            let x = ctx.new_f32("x", &[k, t]).set_input();
            let ws: Vec<_> = (0..n)
                .map(|i| {
                    ctx.new_f32(
                        &format!("w{i}"),
                        &[if outer { m } else { k }, if outer { k } else { m }],
                    )
                    .set_input()
                })
                .collect();
            let mut g = ctx.new_graph(8 * n, false);
            for w in &ws {
                let y = match form {
                    Form::MulMat => ctx.mul_mat(*w, x),
                    Form::OutProd => ctx.out_prod(*w, ctx.transpose(x)),
                    Form::SmallK => ctx.out_prod_tiled(*w, ctx.transpose(x)),
                };
                g.build_forward_expand(y);
            }
            let mut c = backend.compute(&g)?;
            let mut seed = 7u64;
            let mut rnd = || {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            };
            let xs: Vec<f32> = (0..k * t).map(|_| rnd()).collect();
            let wsd: Vec<f32> = (0..k * m).map(|_| rnd()).collect();
            c.write_f32(x, &xs)?;
            for w in &ws {
                // outer: w is aᵀ [m, k]: element (i, kk) at kk*m + i; mul_mat: a [k, m] at i*k + kk.
                let data: Vec<f32> = if outer {
                    (0..k * m)
                        .map(|j| {
                            let (kk, i) = (j / m, j % m);
                            wsd[(i * k + kk) as usize]
                        })
                        .collect()
                } else {
                    wsd.clone()
                };
                c.write_f32(*w, &data)?;
            }
            c.run()?;
            let out = c.read_f32(g.node(g.n_nodes() - 1))?;
            let mut err = 0f64;
            for tt in 0..t {
                for i in 0..m {
                    let r: f64 = (0..k)
                        .map(|kk| {
                            wsd[(i * k + kk) as usize] as f64 * xs[(tt * k + kk) as usize] as f64
                        })
                        .sum();
                    err = err.max((out[(tt * m + i) as usize] as f64 - r).abs());
                }
            }
            eprintln!("k {k} m {m} {form:?}: max |err| {err:.3e}");
            let reps = 10;
            let t0 = Instant::now();
            for _ in 0..reps {
                c.run()?;
            }
            let s = t0.elapsed().as_secs_f64();
            rates.push(2.0 * (k * m * t) as f64 * n as f64 * reps as f64 / s / 1e9);
        }
        println!(
            "{k:>5} {m:>6} {t:>5} {:>9.1} {:>9.1} {:>9.1} {:>13.2} {:>14.2}",
            rates[0],
            rates[1],
            rates[2],
            rates[2] / rates[0],
            rates[2] / rates[1]
        );
    }
    Ok(())
}
