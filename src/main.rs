//! The `egress-proxy` command: parse the command line, build the configuration, run.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use egress_proxy::{BottleCa, CaCommand, Cli, Command, Config, RoutesCommand, RunArgs, Suggester};

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
        })) => suggest(routes.as_deref(), max_literal, &logs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            eprintln!("egress-proxy: {line}");
            ExitCode::FAILURE
        }
    }
}

/// `routes suggest`: open what was named, hand it to [`Suggester`], print its draft.
fn suggest(routes: Option<&Path>, max_literal: usize, logs: &[PathBuf]) -> Result<(), String> {
    let mut suggester = Suggester::new(max_literal);
    if let Some(path) = routes {
        // A routes file is small; one that is not is refused rather than read whole.
        const MAX_ROUTES_BYTES: u64 = 16 << 20;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_ROUTES_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| format!("--routes {}: {e}", path.display()))?;
        if text.len() as u64 > MAX_ROUTES_BYTES {
            return Err(format!("--routes {}: larger than 16 MiB", path.display()));
        }
        suggester = suggester.with_routes(&path.display().to_string(), &text)?;
    }
    let stdin_only = [PathBuf::from("-")];
    let logs = if logs.is_empty() {
        &stdin_only[..]
    } else {
        logs
    };
    let stderr = std::io::stderr();
    let mut warn = |line: &str| {
        let _ = writeln!(stderr.lock(), "{line}");
    };
    for log in logs {
        // The file's name goes before `line N` only when there are several to tell apart.
        let name = (logs.len() > 1).then(|| match log.to_str() {
            Some("-") => "stdin".to_owned(),
            _ => log.display().to_string(),
        });
        let mut reader: Box<dyn BufRead> = if log.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            let file = std::fs::File::open(log).map_err(|e| format!("{}: {e}", log.display()))?;
            Box::new(std::io::BufReader::with_capacity(64 << 10, file))
        };
        suggester
            .read(name.as_deref(), &mut reader, &mut warn)
            .map_err(|e| format!("{}: {e}", log.display()))?;
    }
    let (yaml, notes) = suggester.finish();
    for note in notes {
        warn(&note);
    }
    std::io::stdout()
        .lock()
        .write_all(yaml.as_bytes())
        .map_err(|e| format!("writing the routes: {e}"))
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
