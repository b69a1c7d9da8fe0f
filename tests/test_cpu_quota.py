"""WORKERS=0 starts one worker per usable core: the CPU affinity capped by the container's CPU
quota, read from the cgroup files the kernel exposes (a directory laid out like them here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.runner import usable_cores

AFFINITY = len(os.sched_getaffinity(0))


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", AFFINITY),  # no limit
        ("100000 100000\n", 1),  # one CPU
        ("50000 100000\n", 1),  # half a CPU still needs a worker
        ("150000 100000\n", min(AFFINITY, 2)),  # 1.5 CPUs: rounded up
        (f"{64 * 100000} 100000\n", AFFINITY),  # a quota above the cores the process may use
    ],
)
def test_cgroup_v2_quota_caps_the_worker_count(tmp_path: Path, cpu_max: str, expected: int) -> None:
    write(tmp_path, "cpu.max", cpu_max)
    assert usable_cores(tmp_path) == expected


@pytest.mark.parametrize(
    ("quota", "expected"), [("-1", AFFINITY), ("100000", 1), ("250000", min(AFFINITY, 3))]
)
def test_cgroup_v1_quota_caps_the_worker_count(tmp_path: Path, quota: str, expected: int) -> None:
    write(tmp_path, "cpu/cpu.cfs_quota_us", quota + "\n")
    write(tmp_path, "cpu/cpu.cfs_period_us", "100000\n")
    assert usable_cores(tmp_path) == expected


def test_no_cgroup_files_means_the_affinity(tmp_path: Path) -> None:
    assert usable_cores(tmp_path) == AFFINITY
