"""SLURM (or --cluster local) launcher for fine-tuning (main_finetune.py):
its flags plus the cluster ones of submitit_launch.py (--job_dir, --nodes, --ngpus, --timeout, ...); see README."""
from submitit_launch import launch

if __name__ == '__main__':
    launch('main_finetune', 'mae_finetune')
