"""The serving image's code: settings read once, the inference handlers, the MMS handler service and the
`serve` entrypoint."""
