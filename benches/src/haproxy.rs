//! An HAProxy mTLS pair, the peer the benchmark compares against
//! (see `/work/shared/reference/peer-measurements.md`).
//!
//! client ──plain HTTP──► client-side haproxy (`client_bind`) ══TLS 1.3, client cert══►
//! server-side haproxy (`server_bind`) ──plain HTTP──► app
//!
//! Certificates come from the caller as PEM files. HAProxy's `crt` wants the
//! certificate chain *and* its private key in the same file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::Result;

/// Addresses and PEM files of one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsPair {
    /// Where the client-side haproxy listens for plain HTTP (ADDR_A).
    pub client_bind: SocketAddr,
    /// Where the client-side haproxy connects to its peer (ADDR_B as seen from A).
    pub server_addr: SocketAddr,
    /// Where the server-side haproxy listens for TLS (often equal to `server_addr`).
    pub server_bind: SocketAddr,
    /// The application behind the server side.
    pub app: SocketAddr,
    /// Client certificate chain + key.
    pub client_pem: PathBuf,
    /// Server certificate chain + key.
    pub server_pem: PathBuf,
    /// CA both sides verify the other against.
    pub root_pem: PathBuf,
    /// Name the server's certificate must carry (`verifyhost`), if checked.
    pub verify_host: Option<String>,
}

/// HAProxy's spelling of an address: `1.2.3.4:80`, `ipv6@::1:80`.
fn addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("ipv6@{}:{}", v6.ip(), v6.port()),
    }
}

/// A path as a quoted HAProxy word.
fn path(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn common(role: &str) -> String {
    format!(
        "# Trellis benchmark: {role} of an HAProxy mTLS pair (generated)\n\
         global\n\
         \x20   nbthread 1\n\
         \x20   maxconn 4096\n\
         \x20   ssl-default-bind-options ssl-min-ver TLSv1.3\n\
         \x20   ssl-default-server-options ssl-min-ver TLSv1.3\n\
         \n\
         defaults\n\
         \x20   mode http\n\
         \x20   option http-keep-alive\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         \x20   timeout http-keep-alive 60s\n\
         \n"
    )
}

/// Client side: plain HTTP in on `client_bind`, pooled TLS 1.3 with a client
/// certificate out to `server_addr`.
pub fn client_side_config(p: &MtlsPair) -> String {
    format!(
        "{}frontend plain_in\n\
         \x20   bind {}\n\
         \x20   default_backend mtls_out\n\
         \n\
         backend mtls_out\n\
         \x20   http-reuse always\n\
         \x20   server s1 {} ssl crt {} ca-file {} verify required alpn http/1.1 ssl-min-ver TLSv1.3{}\n",
        common("client side"),
        addr(p.client_bind),
        addr(p.server_addr),
        path(&p.client_pem),
        path(&p.root_pem),
        p.verify_host
            .as_deref()
            .map(|h| format!(" verifyhost {h}"))
            .unwrap_or_default(),
    )
}

/// Server side: TLS 1.3 in on `server_bind`, client certificate required, plain HTTP
/// out to the app.
pub fn server_side_config(p: &MtlsPair) -> String {
    format!(
        "{}frontend mtls_in\n\
         \x20   bind {} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3 alpn http/1.1\n\
         \x20   default_backend app\n\
         \n\
         backend app\n\
         \x20   http-reuse always\n\
         \x20   server app1 {}\n",
        common("server side"),
        addr(p.server_bind),
        path(&p.server_pem),
        path(&p.root_pem),
        addr(p.app),
    )
}

/// Writes `haproxy-client.cfg` and `haproxy-server.cfg` into `dir`; returns their paths
/// (client side, server side).
pub fn write_configs(p: &MtlsPair, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let client = dir.join("haproxy-client.cfg");
    let server = dir.join("haproxy-server.cfg");
    std::fs::write(&client, client_side_config(p))?;
    std::fs::write(&server, server_side_config(p))?;
    Ok((client, server))
}

/// The `haproxy` executable on `PATH`, if any.
pub fn haproxy_on_path() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join("haproxy"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Starts `haproxy -f <config> -db` (foreground). Returns `Ok(None)`, after saying so on
/// stderr, when `haproxy` is not on `PATH`. The caller owns the child: kill and wait it.
pub fn spawn_haproxy(config: &Path) -> Result<Option<Child>> {
    let Some(exe) = haproxy_on_path() else {
        eprintln!("haproxy is not on PATH; skipping the haproxy scenario");
        return Ok(None);
    };
    let child = Command::new(exe)
        .arg("-f")
        .arg(config)
        .arg("-db")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(Some(child))
}

/// `haproxy -c -f <config>`: `Ok(None)` when haproxy is missing, else whether it
/// accepted the file, with its output.
pub fn check_config(config: &Path) -> Result<Option<(bool, String)>> {
    let Some(exe) = haproxy_on_path() else {
        return Ok(None);
    };
    let out = Command::new(exe).arg("-c").arg("-f").arg(config).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Some((out.status.success(), text)))
}

/// [`check_config`], with a missing haproxy or a rejected file as an error.
pub fn check_config_ok(config: &Path) -> Result<()> {
    match check_config(config)? {
        None => Err(crate::BenchError::Setup("haproxy is not installed".into())),
        Some((true, _)) => Ok(()),
        Some((false, text)) => Err(crate::BenchError::Setup(format!(
            "haproxy -c rejected {}:\n{}",
            config.display(),
            text.trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> MtlsPair {
        MtlsPair {
            client_bind: "127.0.0.1:18080".parse().unwrap(),
            server_addr: "10.0.0.2:18443".parse().unwrap(),
            server_bind: "0.0.0.0:18443".parse().unwrap(),
            app: "127.0.0.1:8080".parse().unwrap(),
            client_pem: "/certs/client.pem".into(),
            server_pem: "/certs/server.pem".into(),
            root_pem: "/certs/root.pem".into(),
            verify_host: None,
        }
    }

    #[test]
    fn client_side() {
        let c = client_side_config(&pair());
        assert!(c.contains("mode http"));
        assert!(c.contains("nbthread 1"));
        assert!(c.contains("bind 127.0.0.1:18080\n"));
        assert!(c.contains("http-reuse always"));
        assert!(c.contains(
            "server s1 10.0.0.2:18443 ssl crt \"/certs/client.pem\" ca-file \"/certs/root.pem\" \
             verify required alpn http/1.1 ssl-min-ver TLSv1.3\n"
        ));
        let p = MtlsPair {
            verify_host: Some("server-hap".into()),
            ..pair()
        };
        assert!(client_side_config(&p).contains("ssl-min-ver TLSv1.3 verifyhost server-hap\n"));
    }

    #[test]
    fn server_side() {
        let s = server_side_config(&pair());
        assert!(s.contains(
            "bind 0.0.0.0:18443 ssl crt \"/certs/server.pem\" ca-file \"/certs/root.pem\" \
             verify required ssl-min-ver TLSv1.3"
        ));
        assert!(s.contains("server app1 127.0.0.1:8080\n"));
        assert!(s.contains("nbthread 1"));
    }

    #[test]
    fn ipv6_and_quoting() {
        assert_eq!(addr("[::1]:80".parse().unwrap()), "ipv6@::1:80");
        assert_eq!(path(Path::new("/a b/\"c\".pem")), "\"/a b/\\\"c\\\".pem\"");
    }

    #[test]
    fn writes_files() {
        let dir = std::env::temp_dir().join(format!("trellis-haproxy-{}", std::process::id()));
        let (c, s) = write_configs(&pair(), &dir).unwrap();
        assert!(
            std::fs::read_to_string(&c)
                .unwrap()
                .contains("backend mtls_out")
        );
        assert!(
            std::fs::read_to_string(&s)
                .unwrap()
                .contains("frontend mtls_in")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With haproxy installed, the generated configs and throwaway certificates pass
    /// `haproxy -c`; elsewhere this says so and checks nothing.
    #[test]
    fn haproxy_accepts_the_configs() {
        if haproxy_on_path().is_none() {
            eprintln!("haproxy not installed: config check skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("trellis-haproxy-c-{}", std::process::id()));
        let pki = crate::certs::write_pki(&dir, "server-hap", "client-hap").unwrap();
        let p = MtlsPair {
            client_pem: pki.client,
            server_pem: pki.server,
            root_pem: pki.root,
            verify_host: Some("server-hap".into()),
            ..pair()
        };
        let (c, s) = write_configs(&p, &dir).unwrap();
        check_config_ok(&c).unwrap();
        check_config_ok(&s).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
