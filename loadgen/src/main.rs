//! `shardstore-loadgen`: see `--help` and the crate docs.

use clap::Parser;
use shardstore_loadgen::cpu::{allowed_cpus, pin_current_thread};
use shardstore_loadgen::report::{self, EXIT_FATAL, EXIT_USAGE};
use shardstore_loadgen::{plot, run, Config, RunError};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn main() {
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("shardstore-loadgen: {e}");
        std::process::exit(EXIT_USAGE);
    }
    std::process::exit(real_main(cfg));
}

fn real_main(cfg: Config) -> i32 {
    let cpus = allowed_cpus();
    let pinned: Arc<Mutex<Vec<usize>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(cfg.threads as usize).enable_all();
    if !cfg.no_pin {
        let (cpus, pinned, next) = (cpus.clone(), pinned.clone(), next.clone());
        builder.on_thread_start(move || {
            // Worker threads start first, one per --threads; any later
            // (blocking-pool) thread lands round-robin on the same CPUs.
            let i = next.fetch_add(1, Ordering::Relaxed);
            let cpu = cpus[i % cpus.len()];
            match pin_current_thread(cpu) {
                Ok(()) => {
                    let mut p = pinned.lock().unwrap_or_else(|e| e.into_inner());
                    if !p.contains(&cpu) {
                        p.push(cpu);
                    }
                }
                Err(e) => eprintln!("shardstore-loadgen: pinning a thread to cpu {cpu}: {e}"),
            }
        });
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shardstore-loadgen: starting the runtime: {e}");
            return EXIT_FATAL;
        }
    };
    if cfg.threads as usize > cpus.len() {
        eprintln!(
            "shardstore-loadgen: warning: {} threads on {} allowed CPUs",
            cfg.threads,
            cpus.len()
        );
    }
    let data = match rt.block_on(run(cfg.clone())) {
        Ok(d) => d,
        Err(e @ RunError::Unreachable(_)) | Err(e @ RunError::Fatal(_)) => {
            eprintln!("shardstore-loadgen: {e}");
            return EXIT_FATAL;
        }
    };
    let mut pinned_cpus = pinned.lock().unwrap_or_else(|e| e.into_inner()).clone();
    pinned_cpus.sort_unstable();
    let report = report::build(&cfg, &data, pinned_cpus);
    print!("{}", report.table());
    let mut code = report.result.exit_code;
    if let Some(path) = &cfg.json {
        if let Err(e) = std::fs::write(path, report.to_json()) {
            eprintln!("shardstore-loadgen: writing {}: {e}", path.display());
            code = code.max(EXIT_FATAL);
        }
    }
    if let Some(path) = &cfg.plot {
        let title = format!(
            "{} read ratio {}, size {}, io {}, {}x{} loops",
            cfg.addr,
            cfg.read_ratio.0,
            cfg.size,
            cfg.io_spec(),
            cfg.connections,
            cfg.pipeline
        );
        if let Err(e) = plot::draw(path, &title, &data.totals, &data.timeline) {
            eprintln!("shardstore-loadgen: {e}");
            code = code.max(EXIT_FATAL);
        }
    }
    if code != 0 {
        eprintln!("shardstore-loadgen: {} (exit {code})", report.result.status);
    }
    code
}
