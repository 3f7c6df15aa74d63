//! The `egress-proxy` command: parse the command line, build the configuration, run.

use std::process::ExitCode;

use clap::Parser;
use egress_proxy::ca::BottleCa;
use egress_proxy::config::{CaCommand, Cli, Command, Config, RunArgs};

/// mimalloc: the proxy allocates on every request, and mimalloc does that for less CPU
/// than glibc malloc (docs/decisions.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `pow` is the one libm function the binary calls (tokio's multi-thread scheduler keeps a
/// moving average of task poll times with it). Defined here, from the pure-Rust `libm`
/// crate (musl's algorithm, maintained by the Rust project), it keeps `libm.so.6` out of
/// the process: one shared library fewer to load and ~0.6 MiB less resident memory for
/// every sidecar (docs/benchmarks.md).
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(*args),
        Some(Command::Check { routes_file }) => egress_proxy::reload::load_routes(&routes_file)
            .map(|t| println!("{}: ok, {} routes", routes_file.display(), t.routes().len())),
        Some(Command::Ca(CaCommand::Init { ca_dir })) => BottleCa::load_or_mint(&ca_dir)
            .map(|_| println!("{}", ca_dir.join(egress_proxy::ca::CA_CERT_FILE).display()))
            .map_err(|e| e.to_string()),
        Some(Command::Ca(CaCommand::Show { ca_dir })) => BottleCa::load_existing(&ca_dir)
            .map(|ca| print!("{}", ca.cert_pem()))
            .map_err(|e| e.to_string()),
        Some(Command::Health { admin }) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the runtime: {e}"))
            .and_then(|rt| rt.block_on(egress_proxy::admin::probe(&admin))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            eprintln!("egress-proxy: {line}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<(), String> {
    // Before any token is read: nothing this process holds may reach a core dump.
    egress_proxy::sys::harden_process()?;
    let config = Config::from_args(args)?;
    egress_proxy::logging::init(config.log_format);
    // Spawned, not run in `block_on` itself: under the multi-threaded scheduler
    // (`TOKIO_WORKER_THREADS`) the accept loop then runs on a worker and hands each new
    // connection to the thread that serves it without waking another one. Under the
    // default single-threaded one this is the same thread either way.
    let outcome = runtime()?.block_on(async {
        tokio::spawn(egress_proxy::app::run(config))
            .await
            .map_err(|e| format!("the proxy task ended abnormally: {e}"))?
    });
    egress_proxy::logging::flush();
    outcome
}

/// One thread, tokio's single-threaded scheduler, unless `TOKIO_WORKER_THREADS` asks for
/// the multi-threaded one. A sidecar shares its bottle's CPU with the agent, and one core
/// serves tens of thousands of small requests a second; a second worker spends more CPU
/// per request on cross-thread wake-ups than it buys in throughput, and the
/// single-threaded scheduler does less work per request than the multi-threaded one with
/// one worker (no atomics, no injection queue). The figures are in docs/decisions.md.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    let mut builder = match std::env::var_os("TOKIO_WORKER_THREADS") {
        None => tokio::runtime::Builder::new_current_thread(),
        Some(_) => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .on_thread_park(egress_proxy::logging::on_worker_park)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}
