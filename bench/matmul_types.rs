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
    // Plain memory for every type, then Q4_0/Q4_1/Q8_0 in each of the CPU's rearranging
    // buffer types (AMX where the CPU has it, CPU_REPACK); "-" where a type has no kernel there.
    let mut cols: Vec<(Type, Option<grit::ggml::BufferType>, String)> =
        [Type::F32, Type::F16, Type::BF16, Type::Q8_0, Type::Q4_0, Type::Q4_1]
            .into_iter()
            .map(|t| (t, None, t.name()))
            .collect();
    for b in grit::ggml::BufferType::cpu_matmul() {
        for t in [Type::Q4_0, Type::Q4_1, Type::Q8_0] {
            cols.push((t, Some(b), format!("{}/{}", t.name(), b.name())));
        }
    }
    println!(
        "{:>6} {:>6} {:>5} {}",
        "k",
        "m",
        "T",
        cols.iter().map(|c| format!("{:>18}", c.2)).collect::<String>()
    );
    for (k, m) in shapes {
        let mut row = format!("{k:>6} {m:>6} {t:>5} ");
        for (ty, buft, _) in &cols {
            let ty = *ty;
            if k % ty.block_size() as i64 != 0 {
                row += &format!("{:>18}", "-");
                continue;
            }
            let wctx = Context::new(Capacity::tensors(40))?;
            // 30 weights, as in a 30-layer model: the working set does not fit in cache.
            let ws: Vec<_> = (0..30).map(|_| wctx.new_tensor(ty, &[k, m])).collect();
            wctx.allocate(buft.unwrap_or(backend.weight_buffer_type()))?;
            if buft.is_some() && !ws[0].has_backend_extra() {
                row += &format!("{:>18}", "-");
                continue;
            }
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
            row += &format!("{:>18.1}", flops / s / 1e9);
        }
        println!("{row}");
    }
    Ok(())
}
