from ktjax.demo.train import main

main()
