//! `dpu-image`: create signing keys, build, inspect and verify DPU images.
//!
//! Exit codes: 0 success, 1 error (I/O, malformed image, bad arguments to a command),
//! 2 usage error (from clap), 3 verification failed (signature, key, target or hashes).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use thiserror::Error;

use images::format::{build_image, BuildParams, FormatError, Image, ImageError, VerifyError};
use images::keys::{self, KeyError, TrustedKeys};

#[derive(Parser, Debug)]
#[command(
    name = "dpu-image",
    version,
    about = "Build, inspect and verify signed DPU images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate an Ed25519 signing key pair into DIR (image-signing.key mode 0600, image-signing.pub).
    Keygen {
        /// Output directory (created if missing; existing keys are never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Build and sign an image from a payload (rootfs archive or raw disk image).
    Build {
        /// Payload file.
        #[arg(long)]
        payload: PathBuf,
        /// DPU model the image is for (e.g. bluefield-3).
        #[arg(long)]
        target: String,
        /// dpu-agent version inside the image.
        #[arg(long)]
        agent_version: String,
        /// Chunk size in bytes; K and M suffixes accepted (e.g. 1M).
        #[arg(long, value_parser = parse_size, default_value = "1M")]
        chunk_size: u32,
        /// Secret key file (from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Output image file.
        #[arg(long)]
        out: PathBuf,
        /// Creation time in unix seconds (default: now; set it for reproducible builds).
        #[arg(long)]
        created: Option<u64>,
    },
    /// Print an image's manifest (structure is checked, signature is not: use `verify`).
    Inspect {
        /// Image file.
        image: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Verify signature, target, every chunk hash and the whole-payload hash.
    Verify {
        /// Image file.
        image: PathBuf,
        /// Trusted public key file or directory of *.pub files (repeatable).
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// Require this target.
        #[arg(long)]
        target: Option<String>,
    },
}

#[derive(Debug, Error)]
enum CliError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("verification failed: {0}")]
    Verify(#[from] VerifyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

#[derive(Debug, Error)]
enum SizeError {
    #[error("not a size: {0:?} (use e.g. 65536, 64K or 1M)")]
    Bad(String),
}

fn parse_size(s: &str) -> Result<u32, SizeError> {
    let bad = || SizeError::Bad(s.to_string());
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1u64 << 20),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    u32::try_from(n.checked_mul(mult).ok_or_else(bad)?).map_err(|_| bad())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.cmd {
        Cmd::Keygen { out } => {
            let id = keys::keygen(&out)?;
            println!("key id {id}");
            println!("secret {}", out.join(keys::SECRET_FILE).display());
            println!("public {}", out.join(keys::PUBLIC_FILE).display());
        }
        Cmd::Build {
            payload,
            target,
            agent_version,
            chunk_size,
            key,
            out,
            created,
        } => {
            let key = keys::read_signing_key(&key)?;
            let data = std::fs::read(&payload).map_err(io_err(&payload))?;
            let created_unix = created.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            });
            let params = BuildParams {
                target,
                agent_version,
                chunk_size,
                created_unix,
            };
            let bytes = build_image(&data, &params, &key)?;
            std::fs::write(&out, &bytes).map_err(io_err(&out))?;
            let img = Image::parse(bytes)?;
            println!(
                "built {} image {} ({} bytes, {} chunks)",
                out.display(),
                img.id(),
                img.manifest().payload_size,
                img.manifest().chunk_count()
            );
        }
        Cmd::Inspect { image, json } => {
            let img = Image::read(&image)?;
            let m = img.manifest();
            if json {
                let v = serde_json::json!({
                    "image_id": img.id().to_hex(),
                    "file_size": img.as_bytes().len(),
                    "manifest": m,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("image id       {}", img.id());
                println!("format version {}", m.format_version);
                println!("target         {}", m.target);
                println!("agent version  {}", m.agent_version);
                println!("payload size   {}", m.payload_size);
                println!("chunk size     {}", m.chunk_size);
                println!("chunks         {}", m.chunk_count());
                println!("payload sha256 {}", m.payload_sha256);
                println!("created (unix) {}", m.created_unix);
                println!("key id         {}", m.key_id);
                println!("signature      not checked (use `dpu-image verify`)");
            }
        }
        Cmd::Verify {
            image,
            trust,
            target,
        } => {
            let trust = TrustedKeys::load_all(&trust)?;
            let img = Image::read(&image)?;
            let vm = img.verify(&trust, target.as_deref())?;
            println!(
                "OK {} image {} target {} agent {} signed by key {}",
                image.display(),
                vm.id(),
                vm.manifest().target,
                vm.manifest().agent_version,
                vm.manifest().key_id
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("dpu-image: error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(&format!(": {text}"));
                }
                src = s.source();
            }
            eprintln!("{msg}");
            match e {
                CliError::Verify(_) => ExitCode::from(3),
                _ => ExitCode::from(1),
            }
        }
    }
}
