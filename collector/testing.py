"""Public test helpers and the sink conformance kit (pytest plugin ``collector``); being written."""
