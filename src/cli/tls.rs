//! TLS on the command line: where a member's or the admin's certificate is (`TlsArgs`, shared by
//! `node` and `cluster`), and `xdevice tls dev`, which makes a development CA and certificates.

use std::path::PathBuf;

use anyhow::Result;

use super::exit::bail_usage;
use crate::net::tls::{self, Made, TlsFiles, TlsSource};

/// Where this process's certificate is: a directory as `xdevice tls dev` writes it, or each file
/// by name; or, for tests and benchmarks only, `--plaintext`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Directory holding ca.pem and this identity's certificate and key: node-ID.pem and
    /// node-ID.key for `xdevice node`, admin.pem and admin.key for `xdevice cluster`.
    #[arg(long, env = "XDEVICE_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The cluster CA's certificate (PEM), instead of --tls-dir.
    #[arg(long, env = "XDEVICE_TLS_CA", value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This identity's certificate chain (PEM), signed by the CA.
    #[arg(long, env = "XDEVICE_TLS_CERT", value_name = "FILE", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This identity's private key (PEM).
    #[arg(long, env = "XDEVICE_TLS_KEY", value_name = "FILE", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
    /// Speak clear text with no authentication: anything that reaches the port can join, vote,
    /// write and administer. For tests and benchmarks only.
    #[arg(long, env = "XDEVICE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    pub plaintext: bool,
}

impl TlsArgs {
    /// The choice made, checked: exactly one of --plaintext, --tls-dir, or the three files.
    pub fn source(&self) -> Result<TlsSource> {
        let files = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() })
            }
            (None, None, None) => None,
            _ => bail_usage!("--tls-ca, --tls-cert and --tls-key go together"),
        };
        match (self.plaintext, &self.tls_dir, files) {
            (true, None, None) => Ok(TlsSource::Plaintext),
            (false, Some(dir), None) => Ok(TlsSource::Dir(dir.clone())),
            (false, None, Some(files)) => Ok(TlsSource::Files(files)),
            (false, None, None) => bail_usage!(
                "no TLS certificate: give --tls-dir DIR (make a development one with `xdevice \
                 tls dev`) or --tls-ca, --tls-cert and --tls-key; --plaintext turns \
                 authentication off, for tests only"
            ),
            (true, _, _) => bail_usage!("--plaintext with a TLS certificate: choose one"),
            (false, Some(_), Some(_)) => {
                bail_usage!("--tls-dir with --tls-ca/--tls-cert/--tls-key: choose one")
            }
        }
    }
}

/// Options of `xdevice tls`.
#[derive(clap::Args, Debug)]
pub struct TlsCommand {
    #[command(subcommand)]
    pub op: TlsOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum TlsOp {
    /// Make a development CA for a cluster (unless DIR already holds one) and a certificate for
    /// each --node and for the admin, signed by it. Existing files are kept, so run it again to
    /// add members. The CA's key lies beside the certificates: for tests and trials, not for
    /// production, where certificates come from the operator's own CA with the same names
    /// (docs/operations.md).
    Dev {
        /// Where to write ca.pem, ca.key, node-ID.pem/.key and admin.pem/.key.
        #[arg(long)]
        dir: PathBuf,
        /// The cluster id the stores were formatted with.
        #[arg(long)]
        cluster_id: uuid::Uuid,
        /// A member's node id; repeat for each member.
        #[arg(long = "node", required = true)]
        nodes: Vec<u64>,
        /// Print what was made as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: TlsCommand) -> Result<()> {
    match cmd.op {
        TlsOp::Dev { dir, cluster_id, nodes, json } => {
            if nodes.contains(&0) {
                bail_usage!("--node 0: node ids start at 1");
            }
            let made = tls::create_dev(&dir, cluster_id, &nodes).map_err(anyhow::Error::msg)?;
            if json {
                let list: Vec<_> = made
                    .iter()
                    .map(|m| match m {
                        Made::Created(p) => serde_json::json!({"created": p}),
                        Made::Kept(p) => serde_json::json!({"kept": p}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for m in made {
                    match m {
                        Made::Created(p) => println!("created {}", p.display()),
                        Made::Kept(p) => println!("kept    {}", p.display()),
                    }
                }
            }
        }
    }
    Ok(())
}
