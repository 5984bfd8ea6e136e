"""Legacy entry point from the API guide (section 10): `python generate_encryption_key.py`.

A thin wrapper over `genservectl crypto-key`, keeping the old menu:
1 = random key, 2 = from a password, 3 = from DEFAULT_API_KEY.
"""

from __future__ import annotations

import sys

import click

from genservectl.keys import crypto_key

METHODS = {"1": "random", "2": "password", "3": "default-key"}


def main() -> None:
    """Ask for the method (unless given as the first argument) and print the export line."""
    choice = sys.argv[1] if len(sys.argv) > 1 else click.prompt(
        "1) 随机密钥 (random)  2) 基于密码 (password)  3) 基于DEFAULT_API_KEY (default key)\n选择选项",
        type=click.Choice(list(METHODS)), default="1")
    crypto_key.main(["--method", METHODS.get(choice, choice)], prog_name="generate_encryption_key.py",
                    standalone_mode=True)


if __name__ == "__main__":
    main()
