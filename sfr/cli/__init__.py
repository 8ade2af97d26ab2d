"""The `sfr` console tool: one module per subcommand, each thin (parse, call the core, render)."""
