"""First-party sinks, registered through the ``collector.sinks`` entry points like any plugin."""
