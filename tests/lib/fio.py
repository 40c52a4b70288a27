"""fio's nbd engine as a load that runs until a test has seen what it needs."""

import json
import signal
import subprocess


class FioLoad:
    """fio's nbd engine on `uri` until stopped (time_based, with a runtime no test reaches): a test
    stops it once it has seen what it needs, instead of hoping a fixed run is long enough."""

    def __init__(self, workdir, uri, *args):
        self.out, self.err = workdir / "fio.json", workdir / "fio.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                ["fio", "--name=load", "--ioengine=nbd", f"--uri={uri}", "--time_based",
                 "--runtime=3600", "--output-format=json", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGINT: fio ends its jobs and prints its report. Returns the job's report; fio's own
        failures (a verify error ends it early) are the report's `error`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        text = self.out.read_text()
        assert "{" in text, f"fio exited {self.proc.returncode}: {self.err.read_text()}"
        return json.loads(text[text.index("{"):])["jobs"][0]
