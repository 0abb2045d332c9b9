"""One line per check, the way tests/deploy/check and tests/container/check count them:
"PASS name", "FAIL name: why" or "SKIP name: why". `failed` counts the FAIL lines."""

failed = 0


def report(status, name, detail=""):
    global failed
    if status == "FAIL":
        failed += 1
    line = f"{status} {name}"
    if detail:
        line += ": " + " ".join(str(detail).split())[:600]
    print(line, flush=True)


def run(main):
    """Runs main(), then exits: 1 when a check failed."""
    main()
    raise SystemExit(1 if failed else 0)
