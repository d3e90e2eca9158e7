from modserve.cli import main

if __name__ == "__main__":  # engine processes spawned by vLLM re-import this module
    main()
