"""The fuzz campaigns (issue 11): each one that exists runs for a short budget through the
public entry and must find nothing; the runner reports a failing campaign with its seed and
replay command, bounds a run that hangs, and says which campaign is missing."""
import re
import time
import types

import pytest

from ringminus import entry
from ringminus import fuzz
from ringminus.fuzz import CAMPAIGNS, CampaignMissing, Finding, runner

CI_SECONDS = "8"          # per campaign: about a minute for all six
SUMMARY = re.compile(r"^(\w+): (\d+) runs, (\d+) failures in [\d.]+ s", re.M)


@pytest.mark.parametrize("campaign", CAMPAIGNS)
def test_campaign_finds_nothing(campaign, capsys):
    try:
        fuzz.load(campaign)
    except CampaignMissing as missing:
        pytest.skip(str(missing))
    status = entry.main(["fuzz", campaign, "--seed", "1", "--seconds", CI_SECONDS])
    out = capsys.readouterr().out
    summary = SUMMARY.search(out)
    assert summary, out
    assert summary.group(1) == campaign and int(summary.group(2)) >= 1
    assert (status, int(summary.group(3))) == (0, 0), out


def test_parallel_workers_run_the_seeds(capsys):
    try:
        fuzz.load("smram")
    except CampaignMissing as missing:
        pytest.skip(str(missing))
    assert runner.main(["smram", "--seed", "5", "--runs", "4", "--jobs", "2"]) in (0, 1)
    summary = SUMMARY.search(capsys.readouterr().out)
    assert summary and summary.group(2) == "4"


def _fake(one_run):
    module = types.ModuleType("fake_campaign")
    module.one_run = one_run
    return module


def test_a_failing_campaign_prints_fail_and_replay_lines(monkeypatch, capsys):
    def one_run(seed):
        if seed == 3:
            raise Finding("isolation", f"SMRAM byte at {0xA0000 + seed:#x} seen outside SMM")
        if seed == 5:
            {}["missing"]                                   # an escaped exception
    monkeypatch.setattr(runner, "load", lambda name: _fake(one_run))
    status = entry.main(["fuzz", "smram", "--seed", "2", "--runs", "5"])
    out = capsys.readouterr().out.splitlines()
    assert status == 1
    assert "FAIL smram seed=3 isolation: SMRAM byte at 0xa0003 seen outside SMM" in out
    assert "FAIL smram seed=5 exception: KeyError: 'missing' (raised at tests/fuzz/test_fuzz.py:" \
        in "\n".join(out)
    assert "  replay: ringminus fuzz smram --replay 3" in out
    assert "  replay: ringminus fuzz smram --replay 5" in out
    assert out[-1].startswith("smram: 5 runs, 2 failures in ")
    assert out[-1].endswith("(exception: 1, isolation: 1)")


def test_replay_runs_one_seed_with_its_traceback(monkeypatch, capsys):
    seen = []

    def one_run(seed):
        seen.append(seed)
        raise Finding("contract", "hlt stop without a HLT")
    monkeypatch.setattr(runner, "load", lambda name: _fake(one_run))
    assert runner.main(["streams", "--replay", "42"]) == 1
    out = capsys.readouterr().out
    assert seen == [42]
    assert "FAIL streams seed=42 contract: hlt stop without a HLT" in out
    assert "Traceback (most recent call last):" in out and "in one_run" in out


def test_a_run_that_hangs_is_reported_and_the_campaign_goes_on(monkeypatch, capsys):
    def one_run(seed):
        if seed == 2:
            while True:
                time.sleep(0.01)
    monkeypatch.setattr(runner, "load", lambda name: _fake(one_run))
    monkeypatch.setattr(runner, "HANG_SECONDS", 0.3)
    assert runner.main(["streams", "--runs", "4"]) == 1
    out = capsys.readouterr().out
    assert "FAIL streams seed=2 contract: the run did not finish within 0.3 s" in out
    assert "streams: 4 runs, 1 failures in" in out


def test_ctrl_c_ends_the_campaign_with_its_summary(monkeypatch, capsys):
    def one_run(seed):
        if seed == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(runner, "load", lambda name: _fake(one_run))
    assert runner.main(["savemap", "--runs", "10"]) == 130
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("savemap: 2 runs, 0 failures in ") and last.endswith("(interrupted)")


def test_a_missing_campaign_is_named(monkeypatch, capsys):
    monkeypatch.setattr(fuzz, "CAMPAIGNS", ("nosuch",))
    monkeypatch.setattr(runner, "CAMPAIGNS", ("nosuch",))
    assert runner.main(["nosuch", "--runs", "1"]) == 2
    assert "campaign 'nosuch' is not available: no module ringminus.fuzz.nosuch" in capsys.readouterr().err
    assert runner.main(["all", "--runs", "1"]) == 0
    assert "nosuch: skipped: campaign 'nosuch' is not available" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["streams", "--seconds", "nan"], ["streams", "--runs", "0"],
                                  ["nosuch"], ["streams", "--replay", "1", "--runs", "3"],
                                  ["streams", "--jobs", "x"]])
def test_usage_errors_are_one_line_and_status_2(argv, capsys):
    assert runner.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1


def test_a_stream_that_writes_over_its_smi_handler_is_no_finding():
    """savemap seed 4318564: the random stream stored over the RSM at SMBASE+0x8000 in plain
    RAM before its SMI, so the handler never returned.  The campaign's round trip needs RSM
    there; without it the run proves nothing and is not a finding."""
    from ringminus.fuzz import savemap
    savemap.one_run(4318564)


def test_the_nested_paging_oracle_tells_a_wrong_npf_from_a_right_one():
    """replay's nested-paging scenarios check every #NPF against a walk of their own
    (fuzz/npt.py): a not-present entry explains "not present" and nothing else."""
    from ringminus.fuzz import npt
    from ringminus.intercepts.checker import VmExit
    setup = npt.Setup(host_nx=False, guest_nx=False, damage=((npt._pte(npt.L2_CODE), "not present", 0),))
    machine = npt.build(setup, b"\x90", "kvm", 4 << 20)
    machine.run(max_instructions=200, timeout=30)
    exits = [e for e in machine.events if getattr(e, "code", None) == npt.NPF]
    assert exits and exits[0].info1 == npt.FINAL | npt.U and exits[0].info2 == npt.L2_CODE
    npt.check_exits(machine, setup)                               # the right one passes
    machine.events.append(VmExit(npt.NPF, npt.FINAL | npt.U | npt.P, npt.L2_CODE))   # "present", it says
    with pytest.raises(Finding, match="not present"):
        npt.check_exits(machine, setup)


@pytest.mark.parametrize("seed", [5200012, 5200115, 5200361])
def test_unicorns_own_lookups_under_nested_paging_mark_nothing_accessed(seed):
    """replay seeds 5200012, 5200115, 5200361: restoring a snapshot taken in a guest under
    nested paging deletes code hooks, and Unicorn looks up the addresses whose translations
    it drops through the TLB-fill hook — which set the accessed bit of a nested entry, so the
    restored RAM differed from the snapshot's.  Lookups outside a slice now mark nothing."""
    from ringminus.fuzz import replay
    replay.one_run(seed)


def test_a_scheduled_smi_still_due_after_rsm_is_no_broken_round_trip():
    """savemap seed 5504847: the stream's own OUT to 0xB2 (apm_smi) raised the SMI before
    the one the campaign had scheduled; that one was still due after RSM and was taken at
    the instruction returned to, before its breakpoint — the campaign took it for a round
    trip that did not return.  The round trip is now checked only where nothing is to come."""
    from ringminus.fuzz import savemap
    savemap.one_run(5504847)
