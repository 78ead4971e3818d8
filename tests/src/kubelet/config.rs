//! The kubelet's flags, and the image → local binary map.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Result, anyhow, bail};
use trellis_init::Ipv4Cidr;

/// `trellis-test-kubelet run` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeletConfig {
    /// Admin (or node) kubeconfig to reach the API server with.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// The Node this kubelet registers and binds every Pod to.
    #[arg(long, default_value = "trellis-node")]
    pub node_name: String,
    /// The test bed's id: pod namespaces are `<bed-id>-k<n>`, so the bed's sweep of
    /// dead tests' namespaces finds them too.
    #[arg(long)]
    pub bed_id: String,
    /// Per-pod volumes, container logs and exec plans go here.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// `image=binary,...`: an image whose name (registry, path and tag stripped) is
    /// `image` runs `binary`.
    #[arg(long, default_value = "")]
    pub images: ImageMap,
    /// The node's address on the bridge (the pods' gateway).
    #[arg(long, default_value = "10.244.0.1")]
    pub node_ip: Ipv4Addr,
    /// Pod addresses come from here: disjoint from the bed's own (10.244.0.2 upwards).
    #[arg(long, default_value = "10.244.128.0/17")]
    pub pod_cidr: Ipv4Cidr,
    /// Prefix length of the pods' `eth0` (the whole bridge network).
    #[arg(long, default_value_t = 16)]
    pub pod_prefix_len: u8,
    /// The bridge in the node namespace that pods are plugged into.
    #[arg(long, default_value = "br0")]
    pub bridge: String,
    /// `KUBERNETES_SERVICE_HOST` given to every container.
    #[arg(long, default_value = "10.96.0.1")]
    pub kubernetes_service_host: Ipv4Addr,
    /// `KUBERNETES_SERVICE_PORT` given to every container.
    #[arg(long, default_value_t = 443)]
    pub kubernetes_service_port: u16,
    /// Cap on `terminationGracePeriodSeconds`, so tests do not wait 30 s per pod.
    #[arg(long, default_value_t = 10)]
    pub max_grace_seconds: u64,
}

impl KubeletConfig {
    /// The node's network namespace (`ip netns` name), made by the bed.
    pub fn node_netns(&self) -> String {
        format!("{}-node", self.bed_id)
    }
}

/// Images mapped to local binaries by name.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    entries: Vec<(String, PathBuf)>,
}

impl ImageMap {
    /// A map from `(image name, binary)` pairs.
    pub fn new(entries: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// The binary for `image` (`ghcr.io/x/trellis-proxy:tag` matches `trellis-proxy`).
    pub fn binary_for(&self, image: &str) -> Option<&Path> {
        let name = image_name(image);
        self.entries
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.as_path())
    }

    /// What a container's `command[0]` runs: a mapped binary when its file name is that
    /// of a mapped binary or image (`trellis-proxy`, `/usr/local/bin/trellis-proxy`),
    /// else the command as written (an absolute path on this machine, or looked up in
    /// `PATH`).
    pub fn resolve_command(&self, command: &str) -> PathBuf {
        let base = command.rsplit('/').next().unwrap_or(command);
        self.entries
            .iter()
            .find(|(name, path)| name == base || path.file_name().is_some_and(|f| f == base))
            .map_or_else(|| PathBuf::from(command), |(_, p)| p.clone())
    }

    /// The `--images` value that parses back to this map.
    pub fn to_flag(&self) -> String {
        self.entries
            .iter()
            .map(|(n, p)| format!("{n}={}", p.display()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl FromStr for ImageMap {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, path) = item
                .split_once('=')
                .ok_or_else(|| anyhow!("`{item}`: expected image=binary"))?;
            if name.is_empty() || path.is_empty() {
                bail!("`{item}`: expected image=binary");
            }
            entries.push((name.to_string(), PathBuf::from(path)));
        }
        Ok(Self { entries })
    }
}

/// An image reference's bare name: `ghcr.io/trellis-mesh/trellis-proxy-init:1.0@sha256:..`
/// → `trellis-proxy-init`.
pub fn image_name(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_match_by_bare_name() -> Result<()> {
        let map: ImageMap =
            "trellis-proxy=/b/trellis-proxy,trellis-proxy-init=/b/trellis-proxy,trellis-testapp=/b/app"
                .parse()?;
        assert_eq!(
            image_name("ghcr.io/a/trellis-proxy:latest"),
            "trellis-proxy"
        );
        assert_eq!(
            image_name("localhost:5000/trellis-testapp"),
            "trellis-testapp"
        );
        assert_eq!(image_name("x/y@sha256:abc"), "y");
        assert_eq!(
            map.binary_for("ghcr.io/trellis-mesh/trellis-proxy-init:latest"),
            Some(Path::new("/b/trellis-proxy"))
        );
        assert_eq!(map.binary_for("busybox"), None);
        assert_eq!(
            map.resolve_command("/usr/local/bin/trellis-proxy"),
            PathBuf::from("/b/trellis-proxy")
        );
        assert_eq!(map.resolve_command("app"), PathBuf::from("/b/app"));
        assert_eq!(map.resolve_command("sh"), PathBuf::from("sh"));
        assert!("x".parse::<ImageMap>().is_err());
        Ok(())
    }
}
