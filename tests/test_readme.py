"""Every kdfast command the README shows is one the CLI accepts (#17): each is parsed by its command's own parser
and its config validated, as the command does before any work; the listing commands are run. The README cannot
drift from the CLI again."""
import os
import re
import shlex

import pytest

from kdfast import cache, cli, distill, evaluate, import_weights, lab, labreport, predict, sweep, table, train

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
PARSERS = {"train": train.parse, "distill": distill.parse, "cache": cache.parse, "evaluate": evaluate.parse,
           "sweep": sweep.parse, "lab": lab.parse, "import": import_weights.parse, "report": labreport.parse,
           "predict": predict.parse, "table": table.parse}
MODULES = {f"kdfast.{module.__name__.split('.')[-1]}": name for name, module in
           (("train", train), ("distill", distill), ("cache", cache), ("evaluate", evaluate), ("sweep", sweep),
            ("lab", lab), ("import", import_weights), ("report", labreport), ("predict", predict), ("table", table))}


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """(line number, how, [command, args...]) of every kdfast command in the README: "run" for the code blocks'
    commands (parsed and validated), "named" for those in inline code (parsed when they give a flag and its value,
    else each flag they name must exist)."""
    found, fenced = [], False
    for number, line in enumerate(open(README, encoding="utf-8"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        spans = [line] if fenced else re.findall(r"`([^`]*kdfast[^`]*)`", line)
        for span in spans:
            command = _command(span)
            if command:
                found.append((number, "run" if fenced else "named", command))
    return found


def _command(text: str) -> list[str] | None:
    text = text.split(" # ")[0].split("  #")[0].strip()
    text = re.sub(r"\[([^\]]*)\]", r"\1", text.replace("...", ""))  # [--optional flags]: shown, so checked too
    words = shlex.split(text) if text.count('"') % 2 == 0 and text.count("'") % 2 == 0 else text.split()
    words = [w.split("|")[0] for w in words if not w.startswith("$")]  # a|b: the first; $D: shell variables
    for i, word in enumerate(words):
        if i and words[i - 1] == "from":  # Python: from kdfast import ...
            return None
        if word == "kdfast" and i + 1 < len(words) and (words[i + 1] in cli.COMMANDS or words[i + 1].startswith("-")):
            return words[i + 1:]
        if word in MODULES and (i == 0 or words[i - 1] in ("-m", "launch/slurm.sbatch")):
            return [MODULES[word], *words[i + 1:]]
    return None


def _usable(words: list[str]) -> list[str]:
    """Placeholders (NAME, FILE, R, S ...) stand for a value: a sample one of the right kind."""
    samples = {"NAME": "resnet8", "FILE": "t.h5", "DIR": "runs/x", "K": "2", "N": "2", "S": "0", "SIZE": "32",
               "CKPT": "t.pth", "WEIGHTS": "w.pth", "DATA": "data", "OUT_DIR": "runs/x", "PATH": "p", "R": "cct",
               "D": "data"}
    return [samples.get(w, w) for w in words]


def _help(command: str, args: list[str], capsys) -> str:
    """The --help text of a command (of its sub-command: cache build, info, verify)."""
    sub = args[:1] if command == "cache" and args and not args[0].startswith("-") else []
    with pytest.raises(SystemExit):
        PARSERS[command](sub + ["--help"])
    return capsys.readouterr().out


def test_the_readme_shows_commands_of_every_kind():
    kinds = {words[0] for _, how, words in readme_commands() if len(words) > 2}
    assert {"train", "distill", "cache", "sweep", "lab", "import", "evaluate", "report"} <= kinds, kinds
    assert len(readme_commands()) > 50


@pytest.mark.parametrize("number,how,words", readme_commands(),
                         ids=[f"line{n}-{how}" for n, how, _ in readme_commands()])
def test_every_readme_command_is_accepted_by_the_cli(number, how, words, capsys):
    shown = f"README line {number}: `kdfast {' '.join(words)}`"
    command, args = words[0], _usable(words[1:])
    if command.startswith("-") or command in ("models", "methods", "recipes"):
        assert cli.main(words) == 0, shown
        return
    assert command in PARSERS, f"{shown}: {command!r} is not a command ({', '.join(cli.COMMANDS)})"
    given = args[1:] if command == "cache" and args and not args[0].startswith("-") else args
    if how == "named" and len(given) < 2:  # prose names a command, maybe a flag: it must be one of its flags
        text = _help(command, args, capsys)
        missing = [w for w in args if w.startswith("--") and w.split("=")[0] not in text]
        assert not missing, f"{shown}: {', '.join(missing)} not among its flags"
        return
    try:
        cfg = PARSERS[command](args)
    except SystemExit:
        pytest.fail(f"{shown} is refused by the CLI:\n" + capsys.readouterr().err[-1500:])
    if how == "run" and hasattr(cfg, "validate"):  # inline code may leave out what a whole command needs
        try:
            cfg.validate()
        except ValueError as e:
            pytest.fail(f"{shown} is refused: {e}")


def code_layout_modules() -> set[str]:
    """The modules the README's "Code layout" block names: a line starting with PACKAGE/ (and the indented lines after
    it) names that package's modules (its __init__.py implied); other lines name top-level modules."""
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## Code layout"):]
    block = section.split("```")[1]
    named, package = set(), ""
    for line in block.splitlines():
        if line.strip() and not line.startswith(" "):
            first = line.split()[0]
            package = first if first.endswith("/") else ""
            if package:
                named.add(package + "__init__.py")
        named.update(package + name for name in re.findall(r"\b\w+\.py\b", line))
    return named


def test_the_code_layout_in_the_readme_is_the_tree():
    root = os.path.join(os.path.dirname(README), "kdfast")
    tree = {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
            if f.endswith(".py")}
    named = code_layout_modules()
    assert named == tree, f"missing from the README: {sorted(tree - named)}; not in the tree: {sorted(named - tree)}"


def suggested_commands() -> list[tuple[str, list[str]]]:
    """Every `kdfast ...` command kdfast's own messages suggest (in backticks in its source), its placeholders
    (CKPT, NAME, DATA, an f-string's {field}) filled with a word."""
    root = os.path.join(os.path.dirname(README), "kdfast")
    found = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                for command in re.findall(r"`(kdfast [a-z]+[^`]*)`", text):
                    filled = re.sub(r"\{[^}]*\}", "x", command)
                    for word, value in (("CKPT", "t.pth"), ("NAME", "resnet8"), ("DATA", "d")):
                        filled = re.sub(rf"\b{word}\b", value, filled)
                    found.append((f"{f}: {command}", shlex.split(filled)[1:]))
    return found


@pytest.mark.parametrize("shown,words", suggested_commands())
def test_every_command_kdfast_suggests_is_accepted_by_the_cli(shown, words, capsys):
    if words[0] in ("models", "methods", "recipes"):
        return
    assert words[0] in PARSERS, shown
    command, args = words[0], words[1:]
    given = args[1:] if command == "cache" and args and not args[0].startswith("-") else args
    if "|" in args:  # the sub-commands listed: each is one
        assert all(a in ("build", "info", "verify", "|") for a in args), shown
        return
    if len(given) < 2:  # named in prose, maybe with a flag: it must be one of the command's flags
        text = _help(command, args, capsys)
        assert all(w.split("=")[0] in text for w in given if w.startswith("--")), shown
        return
    try:
        PARSERS[words[0]](words[1:])
    except SystemExit:
        pytest.fail(f"{shown} is refused by the CLI:\n" + capsys.readouterr().err[-1500:])


def test_the_lab_s_kd_advice_is_the_lab_s_command_and_it_parses():
    from kdfast.report import lab_report

    def meta(acc, kd=None):
        return {"model": "m", "parameters": 1, "epochs": 1, "seed": 0, "device": "cpu", "num_processes": 1,
                "precision": "fp32", "wall_time_s": 1.0, "train_img_per_s": 1.0, "test_accuracy": acc, "kd": kd,
                "data": {"source": "s", "fingerprint": "f", "train_size": 1, "test_size": 10000}}

    command = "kdfast lab --preset cpu --data 'my data'"
    report = lab_report({"cnn_teacher": meta(0.9), "cnn_student_no_kd": meta(0.8),
                         "cnn_student_with_kd": meta(0.7, {"method": "kd", "alpha": 0.5, "tau": 4.0})},
                        {"command": command})
    advice = re.search(r"run `([^`]+)`", report["cnn"]["details"]["kd_warning"]).group(1)
    cfg = lab.parse(shlex.split(advice)[2:])
    assert cfg.data == "my data" and cfg.sweep_alphas == (0.1, 0.5, 0.9) and cfg.sweep_taus == (1, 2, 4, 8)
    close = lab_report({"cnn_teacher": meta(0.9), "cnn_student_no_kd": meta(0.8),
                        "cnn_student_with_kd": meta(0.795, {"method": "kd"})}, {"command": command})
    assert "kd_warning" not in close["cnn"]["details"]  # 0.005 on 10,000 images: not resolved, no verdict
