"""`python -m cmvae_engine.engine.cli ...`: the `cmvae-engine` command where its console script is not installed
(a package put on the path rather than installed, as the GPU acceptance run may do)."""

from cmvae_engine.engine.cli import main

main()
