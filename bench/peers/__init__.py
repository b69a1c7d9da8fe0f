"""Servers built the way other stacks teach, measured beside Surge."""
