//! Matmul throughput per weight type on the training shapes of the default model:
//! `matmul_types [THREADS] [TOKENS]` prints GFLOP/s of `W·x` (W [k, m] of each type, x F32
//! [k, T]) for the model's three weight shapes, the way the frozen forward/backward use them.

use std::time::Instant;

use grit::ggml::{quantize, Backend, Capacity, Context, Type};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let t: i64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let mut backend = Backend::cpu(threads)?;
    let shapes: [(i64, i64); 4] = [(576, 576), (576, 1536), (1536, 576), (192, 576)];
    let types = [Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0, Type::Q4_1, Type::Q4_0];
    let repack = grit::ggml::BufferType::cpu_repack();
    eprintln!("repack buffer type: {repack:?} (last column)");
    println!(
        "{:>6} {:>6} {:>5} {}",
        "k",
        "m",
        "T",
        types.iter().map(|t| format!("{:>8}", t.name())).collect::<String>()
    );
    for (k, m) in shapes {
        let mut row = format!("{k:>6} {m:>6} {t:>5} ");
        for (ci, ty) in types.into_iter().enumerate() {
            if k % ty.block_size() as i64 != 0 {
                row += &format!("{:>8}", "-");
                continue;
            }
            let wctx = Context::new(Capacity::tensors(40))?;
            // 30 weights, as in a 30-layer model: the working set does not fit in cache.
            let ws: Vec<_> = (0..30).map(|_| wctx.new_tensor(ty, &[k, m])).collect();
            match (ci >= 6, repack) {
                (true, Some(r)) => wctx.allocate(r)?,
                _ => wctx.allocate(backend.weight_buffer_type())?,
            };
            let mut seed = 1u64;
            let data: Vec<f32> = (0..k * m)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
                })
                .collect();
            let bytes = quantize(ty, &data, k as usize)?;
            for w in &ws {
                wctx.write_bytes(*w, &bytes)?;
            }
            let ctx = Context::new(Capacity::graph(200, 256, false))?;
            let x = ctx.new_f32("x", &[k, t]).set_input();
            let mut g = ctx.new_graph(256, false);
            for w in &ws {
                let y = ctx.mul_mat(*w, x);
                g.build_forward_expand(y);
            }
            let xs = vec![0.01f32; (k * t) as usize];
            let mut c = backend.compute(&g)?;
            c.write_f32(x, &xs)?;
            c.run()?;
            let reps = 5;
            let t0 = Instant::now();
            for _ in 0..reps {
                c.run()?;
            }
            let s = t0.elapsed().as_secs_f64();
            let flops = 2.0 * (k * m * t) as f64 * 30.0 * reps as f64;
            row += &format!("{:>8.1}", flops / s / 1e9);
        }
        println!("{row}");
    }
    Ok(())
}
