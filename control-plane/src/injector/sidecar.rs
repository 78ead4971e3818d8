//! What injection adds to a Pod: the iptables init container, the proxy as a native
//! sidecar, and their volumes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ca_root::CA_ROOT_CONFIGMAP;
use super::{InjectorSettings, ProxyResources, annotations};
use crate::ca::TOKEN_AUDIENCE;

pub const PROXY_CONTAINER: &str = "trellis-proxy";
pub const INIT_CONTAINER: &str = "trellis-init";

/// Whether a Pod spec runs the Trellis proxy: as a native sidecar (an init container
/// that keeps running) or as a plain container.
pub fn has_proxy(spec: &k8s_openapi::api::core::v1::PodSpec) -> bool {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .any(|c| c.name == PROXY_CONTAINER)
}
pub const PROXY_UID: i64 = 1337;
/// The proxy's health port on the Pod IP (DESIGN.md).
pub const HEALTH_PORT: i32 = 15020;

pub const TOKEN_VOLUME: &str = "trellis-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/trellis/tokens";
pub const TOKEN_FILE: &str = "trellis-ca-token";
pub const CA_ROOT_VOLUME: &str = "trellis-ca-root";
pub const CA_ROOT_DIR: &str = "/var/run/secrets/trellis/ca";
pub const CA_ROOT_FILE: &str = "root-cert.pem";
/// iptables takes its lock under /run; the init container's root is read-only.
pub const RUN_VOLUME: &str = "trellis-run";
/// The kubelet refreshes the token at 80% of this; the proxy reads it per renewal.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 12 * 3600;

/// Per-Pod tuning read from annotations.
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    pub resources: ProxyResources,
    pub exclude_inbound_ports: Option<String>,
    pub exclude_outbound_ports: Option<String>,
}

impl Tuning {
    pub fn new(settings: &InjectorSettings, pod_annotations: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| pod_annotations.get(k).filter(|v| !v.is_empty()).cloned();
        let mut resources = settings.resources.clone();
        let fields = [
            (annotations::PROXY_CPU, &mut resources.cpu_request),
            (annotations::PROXY_MEMORY, &mut resources.memory_request),
            (annotations::PROXY_CPU_LIMIT, &mut resources.cpu_limit),
            (annotations::PROXY_MEMORY_LIMIT, &mut resources.memory_limit),
        ];
        for (key, field) in fields {
            if let Some(v) = get(key) {
                *field = v;
            }
        }
        Tuning {
            resources,
            exclude_inbound_ports: get(annotations::EXCLUDE_INBOUND_PORTS),
            exclude_outbound_ports: get(annotations::EXCLUDE_OUTBOUND_PORTS),
        }
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn resources(cpu: &str, memory: &str, cpu_limit: &str, memory_limit: &str) -> ResourceRequirements {
    let q = |v: &str| Quantity(v.to_owned());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q(cpu)),
            ("memory".to_owned(), q(memory)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_owned(), q(cpu_limit)),
            ("memory".to_owned(), q(memory_limit)),
        ])),
        ..Default::default()
    }
}

fn health_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(HEALTH_PORT),
            scheme: Some("HTTP".to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(1),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The proxy, as a native sidecar: an init container with `restartPolicy: Always`
/// starts before the app, keeps running beside it, and does not keep a Job alive.
/// Its startup probe holds the app back until the proxy is ready.
pub fn proxy_container(
    settings: &InjectorSettings,
    tuning: &Tuning,
    app_probes: Option<String>,
    app_metrics: Option<String>,
) -> Container {
    let r = &tuning.resources;
    let mut env = vec![
        field_env("TRELLIS_NAMESPACE", "metadata.namespace"),
        field_env("TRELLIS_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("TRELLIS_POD_NAME", "metadata.name"),
        field_env("TRELLIS_POD_IP", "status.podIP"),
        // Opt-in for apps that listen only on localhost (empty when not annotated).
        field_env(
            "TRELLIS_INBOUND_TO_LOCALHOST",
            "metadata.annotations['trellis.io/inbound-to-localhost']",
        ),
        // Access logs: `stdout` or a path (empty, the default: off).
        field_env(
            "TRELLIS_ACCESS_LOG",
            "metadata.annotations['trellis.io/access-log']",
        ),
    ];
    if let Some(tracing) = &settings.tracing {
        for (name, value) in [
            ("TRELLIS_OTLP_ENDPOINT", tracing.otlp_endpoint.clone()),
            (
                "TRELLIS_TRACE_SAMPLING",
                tracing.sampling_percent.to_string(),
            ),
        ] {
            env.push(EnvVar {
                name: name.to_owned(),
                value: Some(value),
                ..Default::default()
            });
        }
    }
    for (name, value) in [
        (super::probes::APP_PROBES_ENV, app_probes),
        (super::APP_METRICS_ENV, app_metrics),
    ] {
        if let Some(value) = value {
            env.push(EnvVar {
                name: name.to_owned(),
                value: Some(value),
                ..Default::default()
            });
        }
    }
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(settings.proxy_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(
            [
                "run",
                "--trust-domain",
                &settings.trust_domain,
                "--control-addr",
                &settings.control_addr,
                "--control-server-name",
                &settings.control_server_name,
                "--ca-root",
                &format!("{CA_ROOT_DIR}/{CA_ROOT_FILE}"),
                "--service-account-token-file",
                &format!("{TOKEN_DIR}/{TOKEN_FILE}"),
                "--outbound-addr",
                "0.0.0.0:15001",
                "--health-addr",
                "0.0.0.0:15020",
            ]
            .map(str::to_owned)
            .to_vec(),
        ),
        env: Some(env),
        restart_policy: Some("Always".to_owned()),
        ports: Some(vec![ContainerPort {
            name: Some("trellis-health".to_owned()),
            container_port: HEALTH_PORT,
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        startup_probe: Some(health_probe("/ready", 1, 120)),
        readiness_probe: Some(health_probe("/ready", 5, 3)),
        liveness_probe: Some(health_probe("/live", 10, 3)),
        resources: Some(resources(
            &r.cpu_request,
            &r.memory_request,
            &r.cpu_limit,
            &r.memory_limit,
        )),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount(TOKEN_VOLUME, TOKEN_DIR),
            mount(CA_ROOT_VOLUME, CA_ROOT_DIR),
        ]),
        ..Default::default()
    }
}

/// `trellis-proxy init`: writes the Pod's iptables rules, with only NET_ADMIN and
/// NET_RAW. It runs as root (iptables needs it) but cannot escalate.
pub fn init_container(settings: &InjectorSettings, tuning: &Tuning) -> Container {
    let mut args = vec![
        "init".to_owned(),
        "--proxy-uid".to_owned(),
        PROXY_UID.to_string(),
    ];
    if let Some(ports) = &tuning.exclude_inbound_ports {
        args.extend(["--exclude-inbound-ports".to_owned(), ports.clone()]);
    }
    if let Some(ports) = &tuning.exclude_outbound_ports {
        args.extend(["--exclude-outbound-ports".to_owned(), ports.clone()]);
    }
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(settings.init_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some(args),
        resources: Some(resources("10m", "16Mi", "100m", "64Mi")),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned(), "NET_RAW".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: RUN_VOLUME.to_owned(),
            mount_path: "/run".to_owned(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The projected token (audience `trellis-ca`), the root the proxy trusts for the
/// control plane (the ConfigMap the control plane keeps in every namespace, so a
/// new root reaches running Pods), and scratch space for iptables.
pub fn volumes() -> Vec<Volume> {
    vec![
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: TOKEN_FILE.to_owned(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: CA_ROOT_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: CA_ROOT_CONFIGMAP.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: RUN_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}
