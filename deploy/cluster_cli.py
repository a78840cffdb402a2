"""Cluster subcommands of the `splitserve` CLI (up, status, scale, down)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # filled in by the cluster launcher
    return None
