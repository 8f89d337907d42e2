from student_trainer.train import main

if __name__ == "__main__":
    main()
