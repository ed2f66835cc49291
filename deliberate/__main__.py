from deliberate.cli import main

if __name__ == "__main__":  # vLLM spawns its engine process; the guard keeps it from recursing
    main()
