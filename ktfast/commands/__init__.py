"""The command modules: each turns its flags into library calls and registers its commands in
`ktfast.cli`, which imports them; none imports another, or the entry point."""
