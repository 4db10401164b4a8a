"""pip-installable ros2_sab3r library and command-line tools (no ROS graph needed).

The ROS 2 package (interfaces, node executable, launch and config files) is built by
CMakeLists.txt with colcon; this file serves `pip install -e .` for the library, the evaluation,
export and inference tools, and the test suite.
"""

from setuptools import find_packages, setup

setup(
    name='ros2_sab3r',
    version='0.1.0',
    description='Open-vocabulary 3D perception with SAB3R for ROS 2',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['ros2_sab3r', 'ros2_sab3r.*']),
    package_data={'ros2_sab3r': ['model/configs/*.json', 'train/recipes/*.yaml']},
    install_requires=[
        'numpy>=1.26',
        'scipy>=1.11',
        'pillow>=10',
        'torch>=2.4',
        'open_clip_torch>=2.24',
        'safetensors>=0.4',
        'onnx>=1.16',
        'onnxruntime>=1.18',
        'rosbags>=0.10',
        'huggingface_hub>=0.23',
        'timm',
        'tqdm',
        'matplotlib',
        'PyYAML>=6',  # sab3r-train recipes
        'numba>=0.60',  # Locate's similarity loop on int8 codes (mapping/kernels.py)
    ],
    extras_require={
        # NVIDIA's wheels come from their own index; pycuda needs the CUDA driver to build.
        'tensorrt': ['tensorrt>=10', 'pycuda>=2024.1'],
        'test': ['pytest>=8', 'pytest-timeout', 'ruff'],
    },
    entry_points={
        'console_scripts': [
            'perception_node = ros2_sab3r.ros.perception_node:main',
            'sab3r-demo = ros2_sab3r.ros.demo:main',
            'sab3r-infer = ros2_sab3r.model.cli:main',
            'sab3r-convert-checkpoint = ros2_sab3r.model.cli:convert_main',
            'sab3r-eval = ros2_sab3r.eval.cli:main',
            'sab3r-convert = ros2_sab3r.eval.convert:main',
            'sab3r-export = ros2_sab3r.inference.export:main',
            'sab3r-build-engine = ros2_sab3r.inference.trt_engine:main',
            'sab3r-teacher = ros2_sab3r.train.teacher_cli:main',
            'sab3r-train = ros2_sab3r.train.cli:main',
        ],
    },
)
