from grpo.cli import main

if __name__ == "__main__":  # vLLM and the verifier pools spawn processes: keep the guard
    main()
