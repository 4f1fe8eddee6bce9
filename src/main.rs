//! `novacron`: the command line of NovaCron.

mod cli;
mod demo;
mod migrate;
mod remote;

fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`novacron vm list | head`) instead of failing on the write.
    // SAFETY: setting a signal's disposition to its default is async-signal-safe and
    // happens before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::process::exit(cli::main());
}
