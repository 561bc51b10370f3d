"""`vfioctl` against vfiod on a private system bus, on a fake host: each
command runs as nobody in a process of its own, as `python -m vfiod.cli`."""

from __future__ import annotations

import json
import os
import re
import select
import signal
from pathlib import Path

import pytest

from tests.bus import ADDRESS_VARIABLE, NOBODY, PrivateBus, RunResult
from tests.bus.vfiod import VFIOCTL, Clients, Spawned, VfiodProcess, run_vfiod
from tests.fakehost import E1000_A, E1000_B, NIC, SATA, build
from vfiod.cli import main, placeholders, substitute
from vfiod.client import Client


def _can_raise_limits() -> bool:
    """Has this process (and so the vfiod it starts) CAP_SYS_RESOURCE? It
    lets vfiod raise another user's RLIMIT_MEMLOCK; a container may lack it."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


CAN_RAISE = _can_raise_limits()
# vfiod raises the RLIMIT_MEMLOCK of an owner process to the rule's
# max-locked-memory; without CAP_SYS_RESOURCE it cannot even read another
# user's limits, so the rule has none where vfiod could not honour it.
RULE_MEMLOCK = 64 << 20
POLICY = f"""
[[rule]]
name = "nobody-nic"
effect = "allow"
address = "0000:00:10.0"
users = ["nobody"]
managed = true
{f"max-locked-memory = {RULE_MEMLOCK}" if CAN_RAISE else ""}

[[rule]]
name = "nobody-bridged"
effect = "allow"
address = "0000:02:0[12].0"
users = ["nobody"]
managed = true
companions = true
"""


# The command `vfioctl run` starts (as `sh -c CHILD sh ARGS...`): it says,
# in one line of JSON, what it was given (its arguments; what its fds $1, $2
# and $3 are), its locked-memory limit, its parent (vfioctl) and how many of
# the fake kernel's fds that parent still has; waits for a line on stdin;
# exits with 7.
CHILD = r"""
said='['
for arg in "$@"; do said="$said\"$arg\", "; done
for fd in "$1" "$2" "$3"; do said="$said\"$(readlink "/proc/self/fd/$fd")\", "; done
said="$said\"$(ulimit -l)\", \"$PPID\", \"$(ls -l "/proc/$PPID/fd" | grep -c vfio-fake)\"]"
printf '%s\n' "$said"
read -r line
exit 7
"""


def root_client(bus: PrivateBus) -> Client:
    return Client(bus.connect())


def vfioctl(bus: PrivateBus, *args: str, env: dict[str, str] | None = None) -> RunResult:
    """`vfioctl ARGS` as nobody; its exit status and output."""
    return bus.run_as(module="vfiod.cli", args=args, env=env)


def one_line(result: RunResult) -> str:
    """A failure's stderr: one line, no traceback."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("vfioctl: ")
    return lines[0]


# -- without a bus


def test_placeholders() -> None:
    fds = {"container": 5, "group:10": 6, "device:0000:00:10.0": 7}
    command = ["qemu", "fd={container}", "{group:10}", "{device:00:10.0}", "x{{iommufd}}"]
    assert placeholders(command) == ["container", "group:10", "device:0000:00:10.0"]
    assert substitute(command, fds) == ["qemu", "fd=5", "6", "7", "x{iommufd}"]
    # Braces that are no placeholder stay: the shell's, JSON, find's {}, f-strings.
    literal = ["sh", "-c", "echo ${HOME} {} {a,b} ${container}", '{"a": {"b": 1}}', "{fd} {{x}}"]
    assert placeholders(literal) == []
    assert substitute(literal, fds) == literal
    # A name vfiod adds later is a placeholder once a lease has it.
    assert substitute(["{vfio-new:1}"], {"vfio-new:1": 9}) == ["9"]
    with pytest.raises(Exception, match=r"unknown placeholder \{iommfd\}; placeholders are \{c"):
        placeholders(["{iommfd}"])
    with pytest.raises(Exception, match=r"unknown placeholder \{group\}"):
        placeholders(["{group}"])
    with pytest.raises(Exception, match="malformed PCI address"):
        placeholders(["{device:nic}"])
    with pytest.raises(Exception, match=r"\{iommufd\} names no fd of this lease; it has \{conta"):
        substitute(["{iommufd}"], fds)


def test_placeholders_in_a_qemu_command_line() -> None:
    """What the VM tests' QEMU helper (tests/vm/vmm.py) hands to QEMU."""
    fds = {"iommufd": 5, "device:0000:00:10.0": 7, "group:9": 8}
    passthrough = [
        "-object",
        "iommufd,id=i0,fd={iommufd}",
        "-device",
        "vfio-pci,id=hostdev0,iommufd=i0,fd={device:0000:00:10.0}",
    ]
    assert substitute(passthrough, fds) == [
        "-object",
        "iommufd,id=i0,fd=5",
        "-device",
        "vfio-pci,id=hostdev0,iommufd=i0,fd=7",
    ]
    json_arg = '{"driver": "vfio-pci", "fd": "{device:0000:00:10.0}"}'
    assert substitute([json_arg], fds) == ['{"driver": "vfio-pci", "fd": "7"}']
    with pytest.raises(Exception, match=r"\{container\} names no fd of this lease; it has \{iommu"):
        substitute(["fd={container}"], fds)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "acquire" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert main(["check", "nic"]) == 2
    err = capsys.readouterr().err
    assert "vfioctl: malformed PCI address 'nic'" in err
    assert "Traceback" not in err
    assert main(["run", "--device", "0000:00:10.0"]) == 2
    assert capsys.readouterr().err == (
        "vfioctl: run needs a command after --, e.g. `vfioctl run --device ADDR -- qemu ...`\n"
    )
    assert main(["run", "--", "true"]) == 2
    assert main(["run", "--device", "0000:00:10.0", "--", "echo", "{iommfd}"]) == 2
    assert "unknown placeholder {iommfd}" in capsys.readouterr().err
    assert main(["release", "../x"]) == 2
    assert "malformed lease '../x'" in capsys.readouterr().err


def test_check_for_another_user_explains_the_policy_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build(tmp_path / "host", "small", policy=POLICY)
    where = ["--root", str(host.policy_root), "--sysfs", host.sysfs.root]
    assert main(["check", str(NIC), "--user", "nobody", *where]) == 0
    out, err = capsys.readouterr()
    assert "vfiod check-policy --explain" in err
    assert "caller:  user nobody (uid 65534)" in out
    assert "nobody-nic" in out
    assert main(["check", str(NIC), str(SATA), "--user", "nobody", "--json", *where]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [(r["device"]["address"], r["allowed"]) for r in reports] == [
        (str(NIC), True),
        (str(SATA), False),
    ]
    assert main(["check", str(NIC), "--user", "no-such-user", *where]) == 2
    assert "no user 'no-such-user'" in capsys.readouterr().err


# -- against vfiod


def test_list_shows_groups_blockers_and_leases(vfiod: VfiodProcess, nobody: Clients) -> None:
    listed = vfioctl(vfiod.bus, "list").check().stdout
    assert listed.splitlines()[0].split() == [
        "GROUP", "VIABLE", "DEVICE", "IDS", "DRIVER", "RESET", "DESCRIPTION"
    ]  # fmt: skip
    assert "10     no      0000:00:10.0  8086:10d3  e1000e      flr,bus" in listed
    assert "not viable: 0000:00:1f.2 (SATA controller) is bound to ahci" in listed
    assert "LEASE" not in listed

    holder = nobody.spawn(
        """\
lease = vfiod.acquire([sys.argv[1]], managed=True, label="vm-7")
say(lease.id)
sys.stdin.readline()
""",
        str(E1000_A),
    )
    try:
        lease = holder.read()
        listed = vfioctl(vfiod.bus, "list").check().stdout
        assert f"leased to vm-7 (uid {NOBODY}, pid " in listed
        assert f"lease {lease})" in listed
        assert "0000:02:01.0  8086:100e  vfio-pci" in listed
        assert "vfiod moved it from e1000" in listed
        assert listed.split("\n\n")[1].splitlines()[0].split()[:5] == [
            "LEASE", "UID", "PID", "LABEL", "SINCE"
        ]  # fmt: skip
        data = json.loads(vfioctl(vfiod.bus, "list", "--json").check().stdout)
    finally:
        holder.finish()
    groups = {g["id"]: g for g in data["groups"]}
    assert groups["10"]["viable"] is False
    assert groups["10"]["blockers"] == [
        {"address": str(NIC), "reason": "0000:00:10.0 (Ethernet controller) is bound to e1000e"}
    ]
    assert groups["4"] == {
        "id": "4",
        "node": "/dev/vfio/4",
        "noiommu": False,
        "viable": True,
        "blockers": [],
        "devices": ["0000:01:00.0", str(E1000_A), str(E1000_B)],
        "lease": lease,
    }
    devices = {d["address"]: d for d in data["devices"]}
    assert devices[str(E1000_B)]["driver"] == "vfio-pci"
    assert devices[str(E1000_B)]["original_driver"] == "e1000"
    assert devices[str(E1000_B)]["lease"] == lease
    [info] = data["leases"]
    assert (info["id"], info["details"]["label"], info["uid"], info["groups"]) == (
        lease,
        "vm-7",
        NOBODY,
        ["4"],
    )


def test_show_says_why_a_device_can_or_cannot_be_assigned(vfiod: VfiodProcess) -> None:
    shown = vfioctl(vfiod.bus, "show", str(NIC)).check().stdout
    assert "group     10 (not viable), /dev/vfio/10" in shown
    assert "not viable: 0000:00:10.0 (Ethernet controller) is bound to e1000e" in shown
    # vfiod's verdict covers viability: without --managed the group is unusable.
    assert "you       denied (needs-managed): IOMMU group 10 is not viable" in shown
    assert (
        "verdict   no (needs-managed): ask with --managed: vfiod moves 0000:00:10.0 to "
        "vfio-pci where policy allows it"
    ) in shown

    shown = vfioctl(vfiod.bus, "show", "00:1f.2").check().stdout
    assert "shared with 0000:00:1f.0, 0000:00:1f.3: a lease takes the whole group" in shown
    assert "you       denied (no-rule): No policy rule allows user nobody (uid 65534)" in shown
    assert "verdict   no (no-rule): vfiod says why, and who can change that" in shown

    data = json.loads(vfioctl(vfiod.bus, "show", str(NIC), "--managed", "--json").check().stdout)
    assert data["device"]["group"] == "10"
    assert data["access"]["allowed"] is True
    assert (data["access"]["code"], data["access"]["move"]) == ("allowed", [str(NIC)])
    assert data["assignable"] is True
    assert data["verdict"] == (
        "yes: `vfioctl acquire --managed 0000:00:10.0` moves 0000:00:10.0 (e1000e) to "
        "vfio-pci and back afterwards"
    )

    shown = vfioctl(vfiod.bus, "show", "4", "--managed").check().stdout
    assert shown.startswith("group  4 (not viable), /dev/vfio/4\nlease  none\n")
    assert "0000:01:00.0  -        1b36:000e" in shown  # the bridge is nobody's to ask for
    assert "0000:02:01.0  allowed  8086:100e  e1000" in shown
    unmanaged = vfioctl(vfiod.bus, "show", "4").check().stdout
    assert "0000:02:01.0  denied  8086:100e  e1000" in unmanaged
    assert "refuses the lease: needs-managed" in unmanaged
    assert "verdict  no (needs-managed): ask with --managed: vfiod moves 0000:02:01.0, " in (
        unmanaged
    )
    data = json.loads(vfioctl(vfiod.bus, "show", "group:4", "--managed", "--json").check().stdout)
    assert [m["address"] for m in data["members"]] == ["0000:01:00.0", str(E1000_A), str(E1000_B)]
    assert [a["allowed"] for a in data["access"]] == [True, True]

    unknown = vfioctl(vfiod.bus, "show", "99")
    assert unknown.returncode == 1
    assert one_line(unknown).startswith("vfioctl: no device or IOMMU group '99' on this host")


def test_check_asks_vfiod_for_the_caller(vfiod: VfiodProcess) -> None:
    allowed = vfioctl(vfiod.bus, "check", "--managed", str(NIC), "02:01.0").check().stdout
    lines = allowed.splitlines()
    assert lines[0].split() == ["DEVICE", "YOU", "CODE", "REASON"]
    assert lines[1].startswith("0000:00:10.0  allowed  allowed  Allowed by rule 'nobody-nic'")
    assert lines[2].strip() == "moves to vfio-pci: 0000:00:10.0"
    assert lines[3].startswith("0000:02:01.0  allowed  allowed  Allowed by rule 'nobody-bridged'")
    assert lines[4].strip() == "moves to vfio-pci: 0000:02:01.0, 0000:02:02.0"
    assert lines[5].strip() == "also reaches: 0000:02:02.0 (not asked for)"
    mixed = vfioctl(vfiod.bus, "check", "--managed", str(NIC), str(SATA), "0000:00:1e.0", "--json")
    assert mixed.returncode == 1
    answers = json.loads(mixed.stdout)
    assert [(a["device"], a["allowed"], a["code"]) for a in answers] == [
        (str(NIC), True, "allowed"),
        (str(SATA), False, "no-rule"),
        ("0000:00:1e.0", False, "not-found"),
    ]
    assert "no PCI device 0000:00:1e.0" in answers[2]["reason"]
    assert {k: v for k, v in answers[1].items() if k != "reason"} == {
        "device": str(SATA),
        "allowed": False,
        "code": "no-rule",
        "move": [str(SATA), "0000:00:1f.3"],
        "blocker": str(SATA),
        "group": "5",
        "holder": None,
        "companions": ["0000:00:1f.3"],
        "backends": [],
        "next": None,
    }


def test_check_gives_the_next_step_by_reason_code(vfiod: VfiodProcess, nobody: Clients) -> None:
    unmanaged = vfioctl(vfiod.bus, "check", str(NIC))
    assert unmanaged.returncode == 1
    lines = unmanaged.stdout.splitlines()
    assert lines[1].startswith("0000:00:10.0  denied  needs-managed  IOMMU group 10 is not viable")
    assert "Ask with managed=true" in lines[1]  # vfiod's own words, as they are
    assert lines[2:] == [
        " " * 22 + "moves to vfio-pci: 0000:00:10.0",
        " " * 22 + "next: ask with --managed: vfiod moves 0000:00:10.0 to vfio-pci where policy "
        "allows it",
    ]
    [answer] = json.loads(vfioctl(vfiod.bus, "check", str(NIC), "--json").stdout)
    assert (answer["code"], answer["blocker"], answer["next"]) == (
        "needs-managed",
        str(NIC),
        "ask with --managed: vfiod moves 0000:00:10.0 to vfio-pci where policy allows it",
    )
    # A group held now: allowed, but busy, with the lease to wait for.
    holder = nobody.spawn(
        "lease = vfiod.acquire([sys.argv[1]], managed=True)\nsay(lease.id)\nsys.stdin.readline()\n",
        str(E1000_A),
    )
    try:
        lease = holder.read()
        [held] = json.loads(
            vfioctl(vfiod.bus, "check", "--managed", str(E1000_A), "--json").check().stdout
        )
        assert (held["allowed"], held["code"], held["holder"]) == (True, "busy", lease)
        assert held["next"] == f"wait for lease {lease} to end"
        shown = vfioctl(vfiod.bus, "show", str(E1000_A), "--managed").check().stdout
        assert f"verdict   not now: wait for lease {lease} to end" in shown
    finally:
        holder.finish()


def test_refusals_are_one_line_with_the_next_step(vfiod: VfiodProcess) -> None:
    denied = vfioctl(vfiod.bus, "acquire", "--managed", str(SATA))
    assert denied.returncode == 1
    assert "No policy rule allows user nobody (uid 65534) to use 0000:00:1f.2" in one_line(denied)
    # vfiod's words as they are, then vfioctl's next step from CheckAccess's code.
    not_viable = vfioctl(vfiod.bus, "acquire", str(NIC))
    assert not_viable.returncode == 1
    assert not_viable.stderr.splitlines() == [
        "vfioctl: IOMMU group 10 is not viable: 0000:00:10.0 (Ethernet controller) is bound "
        "to e1000e. Ask with managed=true to let vfiod bind it to vfio-pci",
        "vfioctl: ask with --managed: vfiod moves 0000:00:10.0 to vfio-pci where policy allows it",
    ]
    unknown = vfioctl(vfiod.bus, "acquire", "0000:00:1e.0")
    assert unknown.returncode == 1
    assert "no PCI device 0000:00:1e.0" in one_line(unknown)
    for args in (("release", "nope"), ("release", "/org/vfiod1/lease/nope")):
        gone = vfioctl(vfiod.bus, *args)
        assert gone.returncode == 1
        assert one_line(gone) == "vfioctl: no lease nope; it may have ended already"
    assert vfiod.driver(str(NIC)) == "e1000e"
    assert vfiod.driver(str(SATA)) == "ahci"


def test_without_vfiod_or_a_bus(private_bus: PrivateBus) -> None:
    for args in (("list",), ("check", str(NIC)), ("run", "--device", str(NIC), "--", "true")):
        result = vfioctl(private_bus, *args)
        assert result.returncode == 1
        assert one_line(result).startswith("vfioctl: vfiod is not running and could not be started")
    result = vfioctl(private_bus, "list", env={ADDRESS_VARIABLE: "unix:path=/nonexistent/bus"})
    assert result.returncode == 1
    assert one_line(result) == (
        "vfioctl: cannot connect to the system bus at unix:path=/nonexistent/bus: "
        "No such file or directory; is dbus running (`systemctl status dbus`)?"
    )


def test_acquire_holds_the_lease_until_input_ends_or_a_signal(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    held = nobody.spawn(VFIOCTL, "acquire", "--managed", "--json", "--label", "try", str(NIC))
    grant = held.read()
    assert grant["devices"] == [str(NIC)]
    assert grant["groups"] == ["10"]
    assert set(grant["fds"]) == {"container", "group:10", "device:0000:00:10.0"}
    assert vfiod.driver(str(NIC)) == "vfio-pci"
    err = held.finish()  # closes its stdin
    # vfiod's Progress signals, as they come.
    assert "vfioctl: moving 0000:00:10.0 from e1000e to vfio-pci\n" in err
    assert re.search(r"vfioctl: 0000:00:10.0 is on vfio-pci \(\d+\.\d s\)\n", err), err
    assert "vfioctl: vfiod puts 0000:00:10.0 back on e1000e" in err
    assert f"vfioctl: end of input: releasing lease {grant['lease']}" in err
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")

    held = nobody.spawn(VFIOCTL, "acquire", "--managed", str(E1000_A))
    try:
        assert first_line(held).startswith("lease ")
        held.process.send_signal(signal.SIGTERM)
        _, err = held.process.communicate(timeout=20)
    finally:
        if held.process.poll() is None:
            held.kill()
    assert held.process.returncode == 0, err
    assert "vfioctl: SIGTERM: releasing lease" in err
    vfiod.wait_for(lambda: vfiod.driver(str(E1000_B)) == "e1000", "e1000 coming back")
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)


def first_line(spawned: Spawned, timeout: float = 20.0) -> str:
    """The first line of plain output from a spawned vfioctl."""
    assert spawned.process.stdout is not None
    assert select.select([spawned.process.stdout], [], [], timeout)[0], "vfioctl said nothing"
    return spawned.process.stdout.readline()


def test_release_ends_a_lease_that_follows_another_process(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    code = """\
import subprocess
child = subprocess.Popen(["sleep", "60"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
pidfd = os.pidfd_open(child.pid)
lease = vfiod.acquire([sys.argv[1]], managed=True, owner_pidfd=pidfd)
os.close(pidfd)
lease.close()
say({"pid": child.pid, "lease": lease.id})
"""
    out = nobody.run(code, str(NIC))
    try:
        released = vfioctl(vfiod.bus, "release", out["lease"]).check()
        assert released.stderr == f"vfioctl: released lease {out['lease']}\n"
        vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
    finally:
        os.kill(out["pid"], signal.SIGKILL)


def test_run_gives_the_command_its_fds_and_releases_after(
    vfiod: VfiodProcess, nobody: Clients
) -> None:
    fds = ["{container}", "{group:10}", "{device:0000:00:10.0}"]
    literal = ["{{iommufd}}", "${HOME}", "{fd}"]
    running = nobody.spawn(
        VFIOCTL, "run", "--device", "00:10.0", "--managed", "--", "sh", "-c", CHILD, "sh",
        *fds, *literal,
    )  # fmt: skip
    try:
        said = running.read()
        with root_client(vfiod.bus) as root:
            leases = list(root.inventory().leases.values())
        assert vfiod.driver(str(NIC)) == "vfio-pci"
        running.send()  # the command ends
        _, err = running.process.communicate(timeout=20)
    finally:
        if running.process.poll() is None:
            running.kill()
    assert running.process.returncode == 7, err
    numbers, given, targets = said[:3], said[3:6], said[6:9]
    memlock, vfioctl_pid, vfioctl_vfio_fds = said[9:]
    assert all(n.isdigit() for n in numbers)
    assert given == ["{iommufd}", "${HOME}", "{fd}"]
    assert targets == [
        "/memfd:vfio-fake:/dev/vfio/vfio (deleted)",
        "/memfd:vfio-fake:/dev/vfio/10 (deleted)",
        "/memfd:vfio-fake:device 0000:00:10.0 of /dev/vfio/10 (deleted)",
    ]
    # The lease follows vfioctl, the command's parent, and is labelled with the
    # command's name; vfioctl keeps no copy of the fds.
    [lease] = leases
    assert (lease.label, lease.pid, lease.uid, lease.devices) == ("sh", int(vfioctl_pid), NOBODY,
                                                                  (str(NIC),))  # fmt: skip
    assert vfioctl_vfio_fds == "0"
    # vfiod raised vfioctl's locked-memory limit to the rule's max-locked-memory (where
    # it has CAP_SYS_RESOURCE); the command inherited it.
    if CAN_RAISE:
        assert memlock == str(RULE_MEMLOCK // 1024)
    assert "vfioctl: moving 0000:00:10.0 from e1000e to vfio-pci" in err
    assert "Traceback" not in err
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)


def test_run_refuses_a_placeholder_the_lease_has_no_fd_for(vfiod: VfiodProcess) -> None:
    result = vfioctl(vfiod.bus, "run", "--device", str(NIC), "--managed", "--", "echo", "{iommufd}")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "vfioctl: placeholder {iommufd} names no fd of this lease; it has {container}, "
        "{group:10}, {device:0000:00:10.0}"
    )
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
    missing = vfioctl(vfiod.bus, "run", "--device", str(NIC), "--managed", "--", "/no/such/vmm")
    assert missing.returncode == 127
    assert "vfioctl: cannot run /no/such/vmm: No such file or directory" in missing.stderr
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)


@pytest.mark.parametrize(
    ("script", "status"),
    [
        ('trap "exit 5" TERM; echo \\"ready\\"; while :; do sleep 0.1; done', 5),
        ('echo \\"ready\\"; exec sleep 60', 128 + signal.SIGTERM),
    ],
    ids=["command-exits", "command-killed"],
)
def test_run_passes_signals_on_and_exits_with_the_command(
    vfiod: VfiodProcess, nobody: Clients, script: str, status: int
) -> None:
    running = nobody.spawn(
        VFIOCTL, "run", "--device", str(NIC), "--managed", "--", "sh", "-c", script
    )
    try:
        assert running.read() == "ready"
        assert vfiod.driver(str(NIC)) == "vfio-pci"
        running.process.send_signal(signal.SIGTERM)
        _, err = running.process.communicate(timeout=20)
    finally:
        if running.process.poll() is None:
            running.kill()
    assert running.process.returncode == status, err
    assert "Traceback" not in err
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
    # (its record goes a moment after its devices are back)
    vfiod.wait_for(lambda: vfiod.state()["leases"] == {}, "the lease record going", 10)


NOIOMMU_POLICY = """
[[rule]]
name = "nobody-noiommu"
effect = "allow"
address = "0000:00:10.0"
users = ["nobody"]
managed = true
unsafe-noiommu = true
"""


def test_run_with_a_noiommu_device(private_bus: PrivateBus, tmp_path: Path) -> None:
    directory = tmp_path / "vfiod"
    directory.mkdir()
    (directory / "vfiod.toml").write_text("allow-unsafe-noiommu = true\n")
    with run_vfiod(private_bus, directory, NOIOMMU_POLICY, topology="noiommu") as daemon:
        listed = vfioctl(private_bus, "list").check().stdout
        assert "-      -       0000:00:10.0  8086:10d3  e1000e" in listed
        assert "no IOMMU group: assignable only in unsafe no-IOMMU mode" in listed
        shown = vfioctl(private_bus, "show", str(NIC)).check().stdout
        assert "group     none: no IOMMU, so only unsafe no-IOMMU mode can assign it" in shown
        no_consent = vfioctl(private_bus, "acquire", "--managed", str(NIC))
        assert no_consent.returncode == 1
        refusal, hint = no_consent.stderr.splitlines()
        assert "your own consent: ask with the option unsafe-noiommu = true" in refusal
        assert hint.startswith("vfioctl: ask with --unsafe-noiommu, if whoever holds the device")
        ran = vfioctl(
            private_bus, "run", "--device", str(NIC), "--managed", "--unsafe-noiommu", "--",
            "sh", "-c", 'readlink "/proc/self/fd/$1"', "sh", "{group:noiommu-0}",
        ).check()  # fmt: skip
        assert ran.stdout == "/memfd:vfio-fake:/dev/vfio/noiommu-0 (deleted)\n"
        assert "moving 0000:00:10.0 from e1000e to vfio-pci" in ran.stderr
        daemon.wait_for(lambda: daemon.driver(str(NIC)) == "e1000e", "e1000e coming back")


def test_run_with_the_iommufd_backend(vfiod: VfiodProcess) -> None:
    ran = vfioctl(
        vfiod.bus, "run", "--device", str(NIC), "--managed", "--backend", "iommufd", "--",
        "sh", "-c", 'readlink "/proc/self/fd/$1" "/proc/self/fd/$2"', "sh",
        "{iommufd}", "{device:0000:00:10.0}",
    ).check()  # fmt: skip
    iommufd, cdev = ran.stdout.splitlines()
    assert iommufd == "/memfd:vfio-fake:/dev/iommu (deleted)"
    assert cdev.startswith("/memfd:vfio-fake:/dev/vfio/devices/vfio")
    assert "vfioctl: vfiod puts 0000:00:10.0 back on e1000e" in ran.stderr
    vfiod.wait_for(lambda: vfiod.driver(str(NIC)) == "e1000e", "e1000e coming back")
