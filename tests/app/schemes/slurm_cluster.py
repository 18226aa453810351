"""Start and stop a private single-node SLURM (munged + slurmctld + slurmd) for tests.

Everything lives in one folder (key, sockets, state, spool, logs) and the daemons listen on
free loopback ports, so parallel test runs and a real site SLURM do not collide. Needs root
and the Debian packages ``slurmctld slurmd slurm-client munge`` (installed by
``installers/setup.sh test``). Facts behind the config: ../shared/NOTES-slurm.md.

    cluster = SlurmCluster(tmp_dir); cluster.start(); ...; cluster.stop()
    # clients need cluster.env (SLURM_CONF)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None
            and not Path("/usr/sbin", b).exists()]


def why_unavailable() -> str | None:
    """None when a private SLURM can be started here, else the reason."""
    missing = missing_binaries()
    if missing:
        return ("SLURM binaries not installed (" + ", ".join(missing) + "); "
                "`installers/setup.sh test` installs slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "a private SLURM needs root (SlurmUser=root) in this set-up"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin") / name)


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: dict[str, int] = {}

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        host = socket.gethostname().split(".")[0]
        node = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0].strip()
        fields = dict(kv.split("=", 1) for kv in node.split() if "=" in kv)
        node_line = " ".join(f"{k}={v}" for k, v in fields.items() if k != "UpTime")
        self.cpus = int(fields.get("CPUs", "1"))
        self.conf.write_text(f"""ClusterName=scopesidetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
SelectType=select/cons_tres
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
DependencyParameters=kill_invalid_depend
EnforcePartLimits=ALL
ReturnToService=2
MailProg=/bin/true
MinJobAge=30
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _pid_from(self, name: str, timeout: float = 10.0) -> int:
        f = self.root / f"{name}.pid"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                return int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        raise RuntimeError(f"{name} wrote no pid file {f}; see {self.root}")

    def start(self, timeout: float = 30.0) -> None:
        self._write_config()
        m = self.root / "munge"
        subprocess.run([_exe("munged"), "--force", f"--key-file={m}/munge.key",
                        f"--socket={m}/munge.socket", f"--pid-file={self.root}/munged.pid",
                        f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                       check=True, capture_output=True, timeout=30)
        self.pids["munged"] = self._pid_from("munged")
        subprocess.run([_exe("slurmctld"), "-c", "-i", "-f", str(self.conf)], check=True,
                       env=self.env, capture_output=True, timeout=30)
        self.pids["slurmctld"] = self._pid_from("slurmctld")
        subprocess.run([_exe("slurmd"), "-f", str(self.conf)], check=True, env=self.env,
                       capture_output=True, timeout=30)
        self.pids["slurmd"] = self._pid_from("slurmd")
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                               env=self.env)
            if r.stdout.strip() in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the SLURM node never became idle; logs in {self.root}")

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (checking /proc)."""
        if "slurmctld" in self.pids:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env,
                           capture_output=True, timeout=30)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10:
                r = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                   text=True, timeout=30)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            t0 = time.monotonic()
            while _alive(pid) and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
