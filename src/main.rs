//! The `egress-proxy` command: parse the command line, build the configuration, run.

use std::process::ExitCode;

use clap::Parser;
use egress_proxy::{BottleCa, CaCommand, Cli, Command, Config, RoutesCommand, RunArgs};

/// mimalloc (built with `no_thp`): cheaper per-request allocations than glibc malloc
/// without transparent huge pages inflating an idle sidecar. README, "Build and runtime
/// choices, and why", says why and how much.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(*args),
        Some(Command::Check { routes_file }) => egress_proxy::load_routes(&routes_file)
            .map(|t| println!("{}: ok, {} routes", routes_file.display(), t.routes().len())),
        Some(Command::Ca(CaCommand::Init { ca_dir })) => BottleCa::load_or_mint(&ca_dir)
            .map(|_| println!("{}", ca_dir.join(egress_proxy::CA_CERT_FILE).display()))
            .map_err(|e| e.to_string()),
        Some(Command::Ca(CaCommand::Show { ca_dir })) => BottleCa::load_existing(&ca_dir)
            .map(|ca| print!("{}", ca.cert_pem()))
            .map_err(|e| e.to_string()),
        Some(Command::Health { admin }) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the runtime: {e}"))
            .and_then(|rt| rt.block_on(egress_proxy::probe(&admin))),
        Some(Command::Routes(RoutesCommand::Suggest {
            routes,
            max_literal,
            logs,
        })) => egress_proxy::suggest_routes(routes.as_deref(), max_literal, &logs),
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
    egress_proxy::harden_process()?;
    let config = Config::from_args(args)?;
    egress_proxy::init_logs(config.log_format);
    // Spawned, not run in `block_on` itself: under the multi-threaded scheduler
    // (`TOKIO_WORKER_THREADS`) the accept loop then runs on a worker and hands each new
    // connection to the thread that serves it without waking another one. Under the
    // default single-threaded one this is the same thread either way.
    let outcome = runtime()?.block_on(async {
        tokio::spawn(egress_proxy::run(config))
            .await
            .map_err(|e| format!("the proxy task ended abnormally: {e}"))?
    });
    egress_proxy::flush_logs();
    outcome
}

/// One thread, tokio's single-threaded scheduler, unless `TOKIO_WORKER_THREADS` asks for
/// the multi-threaded one: a sidecar shares its bottle's CPU with the agent, and a second
/// worker buys it cross-thread wake-ups, not throughput (README, "Build and runtime
/// choices, and why").
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    let mut builder = match std::env::var_os("TOKIO_WORKER_THREADS") {
        None => tokio::runtime::Builder::new_current_thread(),
        Some(_) => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .on_thread_park(egress_proxy::on_worker_park)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))
}
