"""Print the directory to pass to ``--user-dir`` (``python -m fairseq_thor.path``), so fairseq
commands can load the plugin from anywhere once it is installed:

    fairseq-train DATA --user-dir "$(python -m fairseq_thor.path)" --arch thor_transformer ...
"""
import os


def user_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def main():
    print(user_dir())


if __name__ == "__main__":
    main()
