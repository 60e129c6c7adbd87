"""First-party sinks, registered through the ``collector.sinks`` entry-point group like any plugin."""
