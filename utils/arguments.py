"""An argparse parser whose mistakes answer in one or two lines: the error, and the closest flag for a misspelt one."""
import argparse
import difflib
import re
import sys


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            flag = unknown.group(1).split("=")[0]
            options = [option for action in self._actions for option in action.option_strings]
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
            message = f"unrecognized argument {flag}" + (f" (did you mean {close[0]}?)" if close else "")
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
