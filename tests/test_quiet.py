"""quiet.py: TensorFlow's logger raised inside a block; descriptor 2 sent to a log file for a while."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from bloodcell_lib.quiet import native_stderr_to, quiet_tensorflow


def test_quiet_tensorflow_raises_and_restores_its_logger_level():
    logger = logging.getLogger("tensorflow")
    before = logger.level
    with quiet_tensorflow():
        assert logger.level == logging.ERROR
    assert logger.level == before


def test_native_stderr_to_catches_what_c_code_and_child_processes_write_on_descriptor_2(tmp_path):
    log = tmp_path / "kernel.log"
    with open(log, "ab") as target, native_stderr_to(target):
        os.write(2, b"I0000 a C++ line\n")
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a child\\n')"], check=True)
    os.write(2, b"")  # descriptor 2 works again
    assert log.read_bytes() == b"I0000 a C++ line\nfrom a child\n"
