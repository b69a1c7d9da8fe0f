"""Surge's benchmark suite: seed data, a bare baseline, peer servers, the wrk driver and report."""
