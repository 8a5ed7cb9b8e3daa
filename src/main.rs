use clap::Parser;

fn main() {
    let cli = grit::cli::Cli::parse();
    if let Err(e) = grit::cli::run(cli) {
        // One line: the error and its causes, joined.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
