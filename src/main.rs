use clap::Parser;

fn main() {
    let cli = grit::cli::Cli::parse();
    // `grit … | head` ends quietly; the server keeps Rust's default (a closed pipe is an error).
    if !matches!(cli.command, grit::cli::Command::Serve(_)) {
        grit::llama::default_sigpipe();
    }
    if let Err(e) = grit::cli::run(cli) {
        // One line: the error and its causes, each said once.
        eprintln!("error: {}", grit::cli::error_line(&e));
        std::process::exit(1);
    }
}
