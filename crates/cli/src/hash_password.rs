use std::io::BufRead;
use std::process::ExitCode;

/// Print a salted password hash for a `[[users]]` entry of rewind.toml
///
/// Reads the password from standard input (one line), so it stays out of
/// the shell history, and prints `salt$sha256(salt + password)`:
///
///   echo -n 'secret' | rewind hash-password
///
/// rewind.toml:
///
///   [[users]]
///   name = "chw1"
///   password = "<the printed hash>"
///   databases = ["medic"]
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<ExitCode> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!password.is_empty(), "no password on standard input");
    let salt = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id())
    );
    println!("{}", rewind_gateway::hash_password(&salt, password));
    Ok(ExitCode::SUCCESS)
}
