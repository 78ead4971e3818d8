//! Starting a container: its program (image → local binary), arguments, user, mounts
//! (an [`ExecPlan`] for the `container-exec` wrapper) and log file; and signalling it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::process::{Child, Command};

use super::config::ImageMap;
use super::env::expand;
use super::exec::{ExecPlan, MountPlan};
use super::volumes::PodVolumes;

/// Builds what `container-exec` needs for `container` of `pod`.
pub fn plan(
    pod: &Pod,
    container: &Container,
    images: &ImageMap,
    volumes: &PodVolumes,
    env: &[(String, String)],
    scratch: PathBuf,
    override_command: Option<&[String]>,
) -> Result<ExecPlan> {
    let image = container.image.as_deref().unwrap_or_default();
    let mapped = images.binary_for(image);
    let (program, args) = match override_command {
        Some(cmd) => split_command(cmd, images)?,
        None => match container.command.as_deref() {
            Some(cmd) if !cmd.is_empty() => {
                let expanded: Vec<String> = cmd.iter().map(|c| expand(c, env)).collect();
                let (program, mut args) = split_command(&expanded, images)?;
                args.extend(container.args.iter().flatten().map(|a| expand(a, env)));
                (program, args)
            }
            _ => {
                let program = mapped.ok_or_else(|| {
                    anyhow!("image `{image}` is not mapped to a binary (--images) and the container has no command")
                })?;
                let args = container
                    .args
                    .iter()
                    .flatten()
                    .map(|a| expand(a, env))
                    .collect();
                (program.to_path_buf(), args)
            }
        },
    };
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or_else(|| pod_sc.and_then(|s| s.run_as_user));
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or_else(|| pod_sc.and_then(|s| s.run_as_group));
    let mut mounts = Vec::new();
    for vm in container.volume_mounts.iter().flatten() {
        let dir = volumes
            .dir(&vm.name)
            .ok_or_else(|| anyhow!("volumeMount {}: no such volume", vm.name))?;
        let source = match vm.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => {
                if Path::new(sub)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    bail!(
                        "volumeMount {}: subPath `{sub}` must stay inside the volume",
                        vm.name
                    );
                }
                dir.join(sub)
            }
            _ => dir.to_path_buf(),
        };
        mounts.push(MountPlan {
            source,
            target: PathBuf::from(&vm.mount_path),
            read_only: vm.read_only.unwrap_or(false),
        });
    }
    // Parents before children, so a nested mount lands on top.
    mounts.sort_by_key(|m| m.target.components().count());
    Ok(ExecPlan {
        mounts,
        scratch,
        uid: uid.map(to_id).transpose()?,
        gid: gid.map(to_id).transpose()?,
        working_dir: container.working_dir.clone(),
        program,
        args,
    })
}

fn to_id(id: i64) -> Result<u32> {
    u32::try_from(id).map_err(|_| anyhow!("bad user or group id {id}"))
}

fn split_command(cmd: &[String], images: &ImageMap) -> Result<(PathBuf, Vec<String>)> {
    let (first, rest) = cmd.split_first().ok_or_else(|| anyhow!("empty command"))?;
    Ok((images.resolve_command(first), rest.to_vec()))
}

/// Starts the container: `ip netns exec <netns> unshare -m --propagation private
/// <kubelet> container-exec <plan>`, in a process group of its own, output appended to
/// `log`. The returned child's pid is the program's (every step execs the next).
pub fn spawn(
    kubelet_exe: &Path,
    netns: &str,
    plan: &ExecPlan,
    plan_path: &Path,
    env: &[(String, String)],
    log: &Path,
) -> Result<Child> {
    let json = serde_json::to_vec_pretty(plan)?;
    std::fs::write(plan_path, json).with_context(|| format!("write {}", plan_path.display()))?;
    std::fs::create_dir_all(&plan.scratch)?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let mut cmd = Command::new("/usr/sbin/ip");
    cmd.args(["netns", "exec", netns])
        .args(["/usr/bin/unshare", "-m", "--propagation", "private"])
        .arg(kubelet_exe)
        .arg("container-exec")
        .arg(plan_path)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("start {}", plan.program.display()))
}

/// Sends `signal` (`TERM`, `KILL`) to the container's process group.
pub async fn signal_group(pid: u32, signal: &str) {
    let result = Command::new("/usr/bin/kill")
        .args(["-s", signal, "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = result {
        tracing::warn!(pid, signal, error = %e, "could not signal container");
    }
}
