"""python -m server [--model tiny|wan-1.3b|wan-14b] [--weights DIR] [--host H] [--port P]
                    [--devices auto|cpu|cuda|cuda:N] [--config FILE]"""

if __name__ == "__main__":  # a spawned engine process must not run this again
    from server.cli import main

    main()
