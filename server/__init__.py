"""Surge: the app factory, config, middleware, runner and embedded dev services."""
