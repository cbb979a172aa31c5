#!/usr/bin/env bash
# Serve the frozen reasoner (OpenAI-compatible, served name "reasoner"); see _serve.sh for flags and environment.
exec "$(dirname "${BASH_SOURCE[0]}")/_serve.sh" reasoner "$@"
