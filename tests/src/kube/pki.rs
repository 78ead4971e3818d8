//! The test cluster's PKI, made with rcgen: one cluster CA, the API server's serving
//! certificate, client certificates for admin, the controller manager and the node,
//! the service-account signing key pair, and a kubeconfig per client.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use super::{API_SERVER_IP, KUBERNETES_SERVICE_IP, NODE_NAME};

/// Paths of everything [`ClusterPki::write`] wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The cluster CA certificate (PEM): `--client-ca-file`, `--root-ca-file`, and what
    /// the `kube-root-ca.crt` ConfigMaps carry.
    pub ca_cert: PathBuf,
    /// The cluster CA's private key (PEM, PKCS#8), for tests that sign more.
    pub ca_key: PathBuf,
    /// The API server's serving certificate and key.
    pub apiserver_cert: PathBuf,
    /// The API server's serving key.
    pub apiserver_key: PathBuf,
    /// The service-account token signing key (private, PKCS#8 ECDSA P-256).
    pub service_account_key: PathBuf,
    /// Its public half (`--service-account-key-file`).
    pub service_account_pub: PathBuf,
    /// Kubeconfig of `admin` (group `system:masters`).
    pub admin_kubeconfig: PathBuf,
    /// Kubeconfig of `system:kube-controller-manager`.
    pub controller_manager_kubeconfig: PathBuf,
    /// Kubeconfig of the node `system:node:trellis-node` (group `system:nodes`).
    pub kubelet_kubeconfig: PathBuf,
}

/// The generated material, kept in memory where tests want it.
pub struct ClusterPki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// Where it was written.
    pub files: PkiFiles,
}

impl ClusterPki {
    /// Makes every key and certificate and writes them, with the kubeconfigs for a
    /// server at `server_url`, into `dir` (created).
    pub fn write(dir: &Path, server_url: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = |name: &str| dir.join(name);

        let ca_key = KeyPair::generate().context("CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name("trellis-test-cluster-ca", None);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).context("CA certificate")?;
        let ca_pem = ca.pem();

        // The API server's serving certificate: every name a client inside or outside a
        // pod uses, including the `kubernetes` Service's ClusterIP.
        let mut sans = vec![
            SanType::IpAddress(IpAddr::V4(KUBERNETES_SERVICE_IP)),
            SanType::IpAddress(IpAddr::V4(API_SERVER_IP)),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        for dns in [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "localhost",
        ] {
            sans.push(SanType::DnsName(dns.try_into().context("DNS SAN")?));
        }
        let mut serving = leaf_params("kube-apiserver", None, ExtendedKeyUsagePurpose::ServerAuth);
        serving.subject_alt_names = sans;
        let (apiserver_cert, apiserver_key) = issue(&ca, serving)?;

        let sa_key = KeyPair::generate().context("service-account key")?;

        let client = |cn: &str, org: Option<&str>| -> Result<(String, String)> {
            issue(
                &ca,
                leaf_params(cn, org, ExtendedKeyUsagePurpose::ClientAuth),
            )
        };
        let admin = client("admin", Some("system:masters"))?;
        let kcm = client("system:kube-controller-manager", None)?;
        let node_user = format!("system:node:{NODE_NAME}");
        let kubelet = client(&node_user, Some("system:nodes"))?;

        let files = PkiFiles {
            ca_cert: path("ca.crt"),
            ca_key: path("ca.key"),
            apiserver_cert: path("apiserver.crt"),
            apiserver_key: path("apiserver.key"),
            service_account_key: path("sa.key"),
            service_account_pub: path("sa.pub"),
            admin_kubeconfig: path("admin.kubeconfig"),
            controller_manager_kubeconfig: path("controller-manager.kubeconfig"),
            kubelet_kubeconfig: path("kubelet.kubeconfig"),
        };
        write(&files.ca_cert, &ca_pem)?;
        write(&files.ca_key, &ca.key().serialize_pem())?;
        write(&files.apiserver_cert, &apiserver_cert)?;
        write(&files.apiserver_key, &apiserver_key)?;
        write(&files.service_account_key, &sa_key.serialize_pem())?;
        write(&files.service_account_pub, &sa_key.public_key_pem())?;
        let client_kubeconfig = |user: &str, (cert, key): &(String, String)| {
            kubeconfig(server_url, &ca_pem, user, cert, key)
        };
        write(&files.admin_kubeconfig, &client_kubeconfig("admin", &admin))?;
        write(
            &files.controller_manager_kubeconfig,
            &client_kubeconfig("system:kube-controller-manager", &kcm),
        )?;
        write(
            &files.kubelet_kubeconfig,
            &client_kubeconfig(&node_user, &kubelet),
        )?;
        Ok(Self { ca_pem, files })
    }
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn leaf_params(
    common_name: &str,
    organization: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, organization);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params
}

/// A fresh key and a certificate for it signed by `ca`: (certificate PEM, key PEM).
fn issue(ca: &CertifiedIssuer<'_, KeyPair>, params: CertificateParams) -> Result<(String, String)> {
    let key = KeyPair::generate().context("leaf key")?;
    let cert = params
        .signed_by(&key, ca)
        .context("sign leaf certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content).with_context(|| format!("write {}", path.display()))
}

/// A kubeconfig with everything inline, so it can be copied anywhere (a pod's files).
fn kubeconfig(server: &str, ca_pem: &str, user: &str, cert_pem: &str, key_pem: &str) -> String {
    let credentials = format!(
        "client-certificate-data: {}\n    client-key-data: {}",
        b64(cert_pem),
        b64(key_pem)
    );
    kubeconfig_with(server, ca_pem, user, &credentials)
}

/// A kubeconfig that authenticates with a bearer token.
pub(super) fn token_kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    kubeconfig_with(server, ca_pem, "token", &format!("token: {token}"))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// `credentials`: the user's fields, each line after the first indented by four.
fn kubeconfig_with(server: &str, ca_pem: &str, user: &str, credentials: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: trellis-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: \"{user}\"
  user:
    {credentials}
contexts:
- name: trellis-test
  context:
    cluster: trellis-test
    user: \"{user}\"
current-context: trellis-test
",
        ca = b64(ca_pem),
    )
}
