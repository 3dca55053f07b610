//! `validate` and `schema`: what CI jobs and editors use to check config files.

use std::path::PathBuf;
use std::process::ExitCode;

pub fn run(files: &[PathBuf]) -> Result<ExitCode, String> {
    let mut ok = true;
    for f in files {
        match blob_access_config::load_file(f) {
            Ok(_) => println!("{}: ok", f.display()),
            Err(e) => {
                ok = false;
                eprintln!("{e}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn schema() -> Result<ExitCode, String> {
    let text = serde_json::to_string_pretty(&blob_access_config::json_schema())
        .map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}
